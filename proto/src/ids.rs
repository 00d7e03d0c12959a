//! Identifiers: users, devices, conversations, envelopes and messages.
//!
//! Every id is fixed-size bytes on the wire and on disk, and a short text
//! form for people and JSON (base58 for keys, hex for hashes).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Parsing an id from its text form failed.
#[derive(Debug, thiserror::Error)]
#[error("not a valid {kind}: {reason}")]
pub struct IdParseError {
    kind: &'static str,
    reason: &'static str,
}

macro_rules! key_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(bytes).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&bs58::encode(self.0).into_string())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let s = self.to_string();
                write!(f, "{}({}..)", stringify!($name), &s[..s.len().min(8)])
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                match bs58::decode(s).onto(&mut out) {
                    Ok(32) => Ok(Self(out)),
                    Ok(_) => Err(IdParseError { kind: $kind, reason: "wrong length" }),
                    Err(_) => Err(IdParseError { kind: $kind, reason: "not base58" }),
                }
            }
        }
    };
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident, $len:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; $len]>::try_from(bytes).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &hex::encode(&self.0[..4]))
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| IdParseError { kind: $kind, reason: "expected hex of the right length" })?;
                Ok(Self(out))
            }
        }
    };
}

key_id!(
    /// An account: the ed25519 public user key.
    UserId,
    "user id"
);
key_id!(
    /// A device: its ed25519 public device key (the libp2p peer id derives from it).
    DeviceId,
    "device id"
);
hash_id!(
    /// A conversation. Direct: derived from both user ids; group: random.
    ConversationId,
    32,
    "conversation id"
);
hash_id!(
    /// An envelope: the BLAKE3 hash of its signed bytes, truncated. Also the
    /// message id of the message it carries, the same on every device.
    EnvelopeId,
    16,
    "message id"
);

hash_id!(
    /// What an envelope's header says about its conversation: derived from
    /// a secret only the conversation's members hold (`crate::routing`).
    RoutingTag,
    16,
    "routing tag"
);

/// The user-visible message id is the id of the envelope that created it.
pub type MessageId = EnvelopeId;

impl ConversationId {
    /// The id of the one-to-one conversation between two users: the same on
    /// both sides, whatever the order.
    pub fn direct(a: &UserId, b: &UserId) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut h = blake3::Hasher::new_derive_key("weft v1 direct conversation id");
        h.update(&lo.0);
        h.update(&hi.0);
        Self(*h.finalize().as_bytes())
    }

    /// A new group's id: 16 random bytes, then the first 16 bytes of
    /// their keyed hash. Only ids of this form are taken for groups, so a
    /// group state can never claim the id of a one-to-one conversation
    /// or of an account's own (hashes of user ids): finding a direct id
    /// of this form is a 2^128 search.
    pub fn new_group(nonce: [u8; 16]) -> Self {
        let mut id = [0u8; 32];
        id[..16].copy_from_slice(&nonce);
        id[16..].copy_from_slice(&group_check(&nonce));
        Self(id)
    }

    /// Whether this id has the form of a group's ([`Self::new_group`]).
    pub fn is_group_form(&self) -> bool {
        let (nonce, check) = self.0.split_at(16);
        check == group_check(nonce)
    }
}

fn group_check(nonce: &[u8]) -> [u8; 16] {
    let h = blake3::Hasher::new_derive_key("weft v1 group id")
        .update(nonce)
        .finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.as_bytes()[..16]);
    out
}

impl EnvelopeId {
    pub fn of(signed_bytes: &[u8]) -> Self {
        let h = blake3::hash(signed_bytes);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        Self(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        let u = UserId([7; 32]);
        assert_eq!(u.to_string().parse::<UserId>().ok(), Some(u));
        let m = EnvelopeId([9; 16]);
        assert_eq!(m.to_string().parse::<EnvelopeId>().ok(), Some(m));
        assert!("zz".parse::<EnvelopeId>().is_err());
        assert!("0OIl".parse::<UserId>().is_err());
    }

    #[test]
    fn group_ids_are_never_direct_ids() {
        let g = ConversationId::new_group([3; 16]);
        assert!(g.is_group_form());
        let (a, b) = (UserId([1; 32]), UserId([2; 32]));
        assert!(!ConversationId::direct(&a, &b).is_group_form());
        assert!(!ConversationId::direct(&a, &a).is_group_form());
        let mut forged = g;
        forged.0[31] ^= 1;
        assert!(!forged.is_group_form());
    }

    #[test]
    fn direct_id_is_symmetric() {
        let a = UserId([1; 32]);
        let b = UserId([2; 32]);
        assert_eq!(
            ConversationId::direct(&a, &b),
            ConversationId::direct(&b, &a)
        );
        assert_ne!(
            ConversationId::direct(&a, &b),
            ConversationId::direct(&a, &a)
        );
    }
}
