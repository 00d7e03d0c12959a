//! Routing secrets: how a conversation's member devices recognise its
//! envelopes and find its gossip topic, while nobody else can tell which
//! conversation an envelope or a topic belongs to. Pure: no I/O.
//!
//! Every conversation has a 32-byte routing secret that only its members
//! hold. The envelope header carries its [`RoutingTag`] instead of the
//! conversation id, and the gossipsub topic is derived from it too. A group's
//! secret is chosen by the admin with each new state (so it rotates with
//! every membership change and a removed member cannot follow the group);
//! a one-to-one conversation's (and an account's own) derives from an
//! X25519 exchange between the two accounts' keys, so holding both
//! invites is not enough to compute it.

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::{RoutingTag, UserId};

/// A conversation's routing secret.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Routing([u8; 32]);

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Routing({})", self.tag())
    }
}

/// The other account's key is of low order: no secret can be agreed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the account key is not usable (low order)")]
pub struct LowOrderKey;

impl Routing {
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Self(secret)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The secret of the one-to-one conversation between `me` and `them`
    /// (the same on both sides), or of an account's own conversation when
    /// `them` is `me`.
    pub fn direct(
        my_account_key: &StaticSecret,
        me: &UserId,
        their_account_key: &[u8; 32],
        them: &UserId,
    ) -> Result<Self, LowOrderKey> {
        let shared = my_account_key.diffie_hellman(&PublicKey::from(*their_account_key));
        if !shared.was_contributory() {
            return Err(LowOrderKey);
        }
        let (lo, hi) = if me <= them { (me, them) } else { (them, me) };
        let mut h = blake3::Hasher::new_derive_key("weft v2 direct routing secret");
        h.update(shared.as_bytes());
        h.update(&lo.0);
        h.update(&hi.0);
        Ok(Self(*h.finalize().as_bytes()))
    }

    /// The tag envelopes of this conversation carry in their header.
    pub fn tag(&self) -> RoutingTag {
        let h = blake3::derive_key("weft v2 routing tag", &self.0);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&h[..16]);
        RoutingTag(tag)
    }

    /// The gossipsub topic name.
    pub fn topic(&self) -> String {
        let h = blake3::derive_key("weft v2 gossip topic", &self.0);
        format!("weft/2/{}", hex::encode(&h[..20]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> (StaticSecret, [u8; 32]) {
        let secret = StaticSecret::from([seed; 32]);
        let public = PublicKey::from(&secret).to_bytes();
        (secret, public)
    }

    #[test]
    fn both_sides_agree_and_outsiders_do_not() {
        let (a, a_pub) = key(1);
        let (b, b_pub) = key(2);
        let (m, _) = key(3);
        let (alice, bob) = (UserId([1; 32]), UserId([2; 32]));
        let ab = Routing::direct(&a, &alice, &b_pub, &bob).unwrap();
        let ba = Routing::direct(&b, &bob, &a_pub, &alice).unwrap();
        assert_eq!(ab, ba);
        assert_eq!((ab.tag(), ab.topic()), (ba.tag(), ba.topic()));
        // Mallory holds both public keys (both invites) but neither secret:
        // with her own key she computes something else.
        let guess = Routing::direct(&m, &alice, &b_pub, &bob).unwrap();
        assert_ne!(guess.tag(), ab.tag());
        // An account's own conversation differs from its direct ones.
        let own = Routing::direct(&a, &alice, &a_pub, &alice).unwrap();
        assert_ne!(own.tag(), ab.tag());
        assert!(ab.topic().starts_with("weft/2/"));
    }

    #[test]
    fn a_low_order_key_is_refused() {
        let (a, _) = key(1);
        assert_eq!(
            Routing::direct(&a, &UserId([1; 32]), &[0; 32], &UserId([2; 32])),
            Err(LowOrderKey)
        );
    }
}
