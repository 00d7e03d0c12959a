//! The mailbox protocol between devices and relays (`/weft/mailbox/1`):
//! the messages, mailbox ids and signed registrations. No I/O: the relay
//! (`relay/`) serves it and the node's network task speaks it, both with
//! the direct protocol's framing (one `u32`-length-prefixed postcard value
//! each way).
//!
//! A device registers with a relay (signed by its device key, carrying its
//! user-certified device certificate). Anyone may deposit envelopes for a
//! mailbox; the relay stores them durably before it answers. The device
//! fetches its own mailbox — the relay knows it by the libp2p connection's
//! authenticated peer id, bound at registration — in pages by cursor, and
//! acknowledges what it has stored; only then does the relay delete.

use std::fmt;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::identity::{DeviceCertificate, DeviceSigner, IdentityError, peer_id_of, sig_bytes};
use crate::ids::DeviceId;

pub const MAILBOX_PROTOCOL: &str = "/weft/mailbox/1";
/// Most envelopes in one deposit.
pub const MAX_DEPOSIT: usize = 256;
/// Most envelopes one fetch returns.
pub const MAX_FETCH: u32 = 1024;
/// Longest wakeup URL.
pub const MAX_URL: usize = 2048;
/// How old (or how far in the future) a registration may be.
pub const REGISTRATION_WINDOW_MS: i64 = 10 * 60 * 1000;

const REGISTRATION_CONTEXT: &[u8] = b"weft v1 mailbox registration";

/// A mailbox at one relay: derived from the device and the relay, so the
/// same device has unrelated ids at different relays and the id is not a
/// user or device id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MailboxId(pub [u8; 16]);

impl MailboxId {
    pub fn of(device: &DeviceId, relay: &PeerId) -> Self {
        let mut h = blake3::Hasher::new_derive_key("weft v1 mailbox id");
        h.update(&device.0);
        h.update(&relay.to_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Self(id)
    }
}

impl fmt::Display for MailboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MailboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MailboxId({})", hex::encode(&self.0[..4]))
    }
}

/// A device's request for a mailbox at one relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub certificate: DeviceCertificate,
    /// The relay's peer id (bytes): a registration is good at one relay.
    pub relay: Vec<u8>,
    pub at_ms: i64,
    /// A UnifiedPush-compatible endpoint the relay POSTs a content-free
    /// wakeup to when mail arrives while the device is away.
    pub wakeup: Option<String>,
    /// An invite token, for relays that admit by token.
    pub token: Option<String>,
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
}

/// Why a registration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationError {
    #[error("the certificate is not signed by its user key")]
    Certificate,
    #[error("the registration is not signed by the device")]
    Signature,
    #[error("the registration is for another relay")]
    OtherRelay,
    #[error("the registration was made by another peer than the one sending it")]
    OtherPeer,
    #[error("the registration is too old or from the future")]
    Stale,
    #[error("the wakeup URL is not an http(s) URL of at most {MAX_URL} bytes")]
    BadUrl,
}

impl Registration {
    pub fn new(
        identity: &impl DeviceSigner,
        relay: &PeerId,
        at_ms: i64,
        wakeup: Option<String>,
        token: Option<String>,
    ) -> Self {
        use ed25519_dalek::Signer;
        let mut r = Self {
            certificate: identity.certificate().clone(),
            relay: relay.to_bytes(),
            at_ms,
            wakeup,
            token,
            signature: [0; 64],
        };
        r.signature = identity
            .device_signing_key()
            .sign(&r.signed_bytes())
            .to_bytes();
        r
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let body = (
            &self.certificate,
            &self.relay,
            self.at_ms,
            &self.wakeup,
            &self.token,
        );
        let mut m = REGISTRATION_CONTEXT.to_vec();
        m.extend(postcard::to_stdvec(&body).unwrap_or_default());
        m
    }

    /// Checks a registration received by `relay` from `sender` at `now_ms`;
    /// returns the mailbox it opens.
    pub fn verify(
        &self,
        relay: &PeerId,
        sender: &PeerId,
        now_ms: i64,
    ) -> Result<MailboxId, RegistrationError> {
        if self.relay != relay.to_bytes() {
            return Err(RegistrationError::OtherRelay);
        }
        let device = self.certificate.device;
        if peer_id_of(&device) != *sender {
            return Err(RegistrationError::OtherPeer);
        }
        if (now_ms - self.at_ms).abs() > REGISTRATION_WINDOW_MS {
            return Err(RegistrationError::Stale);
        }
        if let Some(url) = &self.wakeup
            && (url.len() > MAX_URL || !(url.starts_with("http://") || url.starts_with("https://")))
        {
            return Err(RegistrationError::BadUrl);
        }
        self.certificate
            .verify()
            .map_err(|_| RegistrationError::Certificate)?;
        crate::identity::verify(&device.0, &self.signed_bytes(), &self.signature).map_err(|e| {
            match e {
                IdentityError::BadSignature(_) | IdentityError::Malformed(_) => {
                    RegistrationError::Signature
                }
                _ => RegistrationError::Signature,
            }
        })?;
        Ok(MailboxId::of(&device, relay))
    }
}

/// What a device or a depositor asks of a relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailboxRequest {
    /// Opens (or renews) the sender's mailbox at this relay.
    Register(Box<Registration>),
    /// Stores envelopes for a mailbox (anyone may; at most [`MAX_DEPOSIT`]).
    Deposit {
        mailbox: MailboxId,
        envelopes: Vec<Vec<u8>>,
    },
    /// Up to `limit` of the sender's own mail after cursor `after`.
    Fetch { after: u64, limit: u32 },
    /// The sender has stored everything up to `up_to`: delete it.
    Ack { up_to: u64 },
    /// From the relay to a connected device: mail arrived, fetch it.
    Wakeup,
}

/// Why a relay refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Malformed or over a size limit.
    BadRequest,
    /// Not admitted (allow-list, token) or a bad registration.
    Forbidden,
    /// The sender has no mailbox here (register first).
    NotRegistered,
    /// The mailbox is over its count or byte quota.
    MailboxFull,
    /// Too many requests from this peer; try later.
    RateLimited,
    /// The relay is shutting down or its storage failed.
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailboxResponse {
    Registered {
        mailbox: MailboxId,
        /// How long mail is kept.
        ttl_secs: u64,
    },
    /// Every envelope of the deposit is stored durably.
    Deposited {
        accepted: u32,
    },
    /// Mail in cursor order; `more` if the mailbox holds more after it.
    Mail {
        items: Vec<(u64, Vec<u8>)>,
        more: bool,
    },
    Acked {
        deleted: u32,
    },
    Ok,
    Refused {
        reason: Refusal,
        message: String,
    },
}

impl MailboxRequest {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }
}

impl MailboxResponse {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }

    pub fn refused(reason: Refusal, message: impl Into<String>) -> Self {
        Self::Refused {
            reason,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Registrations are tested with real device identities in
    // `node/tests/mailbox.rs`.
    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = MailboxRequest::decode(&bytes);
            let _ = MailboxResponse::decode(&bytes);
        }
    }
}
