//! Identity: this device's keys. The account's user key (where this
//! device holds it), the device's signing and DH keys and the account's
//! X25519 key, loaded from `identity.key` by the home module; what they
//! sign and issue (certificates, revocations, invites) is wire format,
//! in `weft_proto::identity`, re-exported here. Pure: no I/O.

pub use weft_proto::identity::*;

use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::{DeviceId, UserId};

/// Derives the account key of an account created before protocol 2 from
/// its user key (see `Identity::upgrade_v1`).
const ACCOUNT_KEY_CONTEXT: &str = "weft v2 account key from user key";

/// The secret keys of one device: its own signing and DH keys, and the
/// account's user key where this device holds it.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct SecretKeys {
    pub user: Option<[u8; 32]>,
    pub device: [u8; 32],
    pub device_dh: [u8; 32],
    /// The account's X25519 key, the same on every device of the account.
    pub account_dh: [u8; 32],
}

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKeys(..)")
    }
}

/// A device's loaded identity: keys, certificate and display name.
#[derive(Clone)]
pub struct Identity {
    user_key: Option<SigningKey>,
    user_id: UserId,
    device_key: SigningKey,
    device_dh: x25519_dalek::StaticSecret,
    account_dh: x25519_dalek::StaticSecret,
    certificate: DeviceCertificate,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A brand-new account with its first device.
    pub fn generate(now_ms: i64) -> Result<Self, IdentityError> {
        let secrets = SecretKeys {
            user: Some(random_bytes()?),
            device: random_bytes()?,
            device_dh: random_bytes()?,
            account_dh: random_bytes()?,
        };
        Self::from_secrets(&secrets, None, now_ms)
    }

    /// A deterministic identity from a seed: for tests and simulations only.
    pub fn from_seed(seed: &[u8], now_ms: i64) -> Result<Self, IdentityError> {
        let derive = |ctx: &str| blake3::derive_key(ctx, seed);
        let secrets = SecretKeys {
            user: Some(derive("weft test user key")),
            device: derive("weft test device key"),
            device_dh: derive("weft test device dh key"),
            account_dh: derive("weft test account dh key"),
        };
        Self::from_secrets(&secrets, None, now_ms)
    }

    /// Rebuilds an identity from stored secrets. A device without the user
    /// key must bring the certificate the user key issued for it.
    pub fn from_secrets(
        secrets: &SecretKeys,
        certificate: Option<DeviceCertificate>,
        now_ms: i64,
    ) -> Result<Self, IdentityError> {
        let device_key = SigningKey::from_bytes(&secrets.device);
        let device_dh = x25519_dalek::StaticSecret::from(secrets.device_dh);
        let account_dh = x25519_dalek::StaticSecret::from(secrets.account_dh);
        let user_key = secrets.user.map(|b| SigningKey::from_bytes(&b));
        let certificate = match (certificate, &user_key) {
            (Some(cert), _) => cert,
            (None, Some(user_key)) => {
                let device = DeviceId(device_key.verifying_key().to_bytes());
                let dh = x25519_dalek::PublicKey::from(&device_dh).to_bytes();
                let user = UserId(user_key.verifying_key().to_bytes());
                let consent = DeviceCertificate::consent(&device_key, &user, &dh);
                DeviceCertificate::issue(
                    user_key,
                    &device,
                    dh,
                    x25519_dalek::PublicKey::from(&account_dh).to_bytes(),
                    consent,
                    now_ms,
                )?
            }
            (None, None) => return Err(IdentityError::Malformed("device has no certificate")),
        };
        certificate.verify()?;
        if certificate.device.0 != device_key.verifying_key().to_bytes()
            || certificate.dh != x25519_dalek::PublicKey::from(&device_dh).to_bytes()
        {
            return Err(IdentityError::Malformed(
                "certificate is for another device",
            ));
        }
        if certificate.account_dh != x25519_dalek::PublicKey::from(&account_dh).to_bytes() {
            return Err(IdentityError::Malformed(
                "certificate names another account key",
            ));
        }
        Ok(Self {
            user_id: certificate.user,
            user_key,
            device_key,
            device_dh,
            account_dh,
            certificate,
        })
    }

    pub fn secrets(&self) -> SecretKeys {
        SecretKeys {
            user: self.user_key.as_ref().map(SigningKey::to_bytes),
            device: self.device_key.to_bytes(),
            device_dh: self.device_dh.to_bytes(),
            account_dh: self.account_dh.to_bytes(),
        }
    }

    /// Upgrades the keys of a device made under protocol 1 (no account
    /// key, a certificate without the device's consent). Only a device
    /// holding the user key can: it derives the account key from the user
    /// key and certifies itself again. A device linked under protocol 1
    /// must be linked again.
    pub fn upgrade_v1(
        user: Option<[u8; 32]>,
        device: [u8; 32],
        device_dh: [u8; 32],
        now_ms: i64,
    ) -> Result<Self, IdentityError> {
        let Some(user) = user else {
            return Err(IdentityError::LinkedBeforeV2);
        };
        let secrets = SecretKeys {
            user: Some(user),
            device,
            device_dh,
            account_dh: blake3::derive_key(ACCOUNT_KEY_CONTEXT, &user),
        };
        Self::from_secrets(&secrets, None, now_ms)
    }

    /// The account's X25519 key (routing secrets of direct conversations
    /// derive from it).
    pub fn account_dh_secret(&self) -> &x25519_dalek::StaticSecret {
        &self.account_dh
    }

    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.device_key.verifying_key().to_bytes())
    }

    pub fn certificate(&self) -> &DeviceCertificate {
        &self.certificate
    }

    pub fn device_signing_key(&self) -> &SigningKey {
        &self.device_key
    }

    pub fn device_dh_secret(&self) -> &x25519_dalek::StaticSecret {
        &self.device_dh
    }

    /// The libp2p identity of this device: the same ed25519 key.
    pub fn libp2p_keypair(&self) -> Result<libp2p::identity::Keypair, IdentityError> {
        let mut secret = self.device_key.to_bytes();
        libp2p::identity::Keypair::ed25519_from_bytes(&mut secret)
            .map_err(|_| IdentityError::Malformed("device key rejected by libp2p"))
    }

    pub fn peer_id(&self) -> PeerId {
        peer_id_of(&self.device_id())
    }

    /// Whether this device holds the user key (it can certify devices).
    pub fn holds_user_key(&self) -> bool {
        self.user_key.is_some()
    }

    /// Certifies another device of this account, which consented with
    /// its own key (`consent`, see [`DeviceCertificate::consent`]). Needs
    /// the user key.
    pub fn certify(
        &self,
        device: &DeviceId,
        dh: [u8; 32],
        consent: [u8; 64],
        now_ms: i64,
    ) -> Result<DeviceCertificate, IdentityError> {
        let user_key = self.user_key.as_ref().ok_or(IdentityError::Malformed(
            "this device does not hold the user key",
        ))?;
        DeviceCertificate::issue(
            user_key,
            device,
            dh,
            self.certificate.account_dh,
            consent,
            now_ms,
        )
    }

    /// Revokes a device of this account for good. Needs the user key.
    pub fn revoke(&self, device: &DeviceId, now_ms: i64) -> Result<Revocation, IdentityError> {
        let user_key = self.user_key.as_ref().ok_or(IdentityError::Malformed(
            "this device does not hold the user key",
        ))?;
        Ok(Revocation::issue(user_key, device, now_ms))
    }

    /// Signs an invite for this account with the given name, device
    /// certificates and address hints, and encodes it. Needs the user key.
    pub fn invite(
        &self,
        name: &str,
        devices: Vec<DeviceCertificate>,
        addrs: Vec<String>,
        now_ms: i64,
    ) -> Result<String, IdentityError> {
        let user_key = self.user_key.as_ref().ok_or(IdentityError::Malformed(
            "this device does not hold the user key",
        ))?;
        let invite = Invite::create(user_key, name, devices, addrs, now_ms)?;
        Ok(invite.encode_with(user_key))
    }
}

impl DeviceSigner for Identity {
    fn certificate(&self) -> &DeviceCertificate {
        Identity::certificate(self)
    }

    fn device_signing_key(&self) -> &SigningKey {
        Identity::device_signing_key(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alice() -> Identity {
        Identity::from_seed(b"alice", 1_700_000_000_000).unwrap()
    }

    #[test]
    fn certificate_verifies_and_detects_forgery() {
        let a = alice();
        a.certificate().verify().unwrap();
        let mut forged = a.certificate().clone();
        forged.dh[0] ^= 1;
        assert!(forged.verify().is_err());
        let bytes = a.certificate().to_bytes();
        assert_eq!(
            DeviceCertificate::from_bytes(&bytes).unwrap(),
            *a.certificate()
        );
    }

    #[test]
    fn a_certificate_needs_the_devices_consent() {
        let (a, b) = (alice(), Identity::from_seed(b"bob", 1).unwrap());
        let dh = b.certificate().dh;
        // Bob's device consented to bob's account, not to alice's.
        let bobs_consent = b.certificate().consent;
        assert!(matches!(
            a.certify(&b.device_id(), dh, bobs_consent, 5),
            Err(IdentityError::BadSignature(_))
        ));
        // With its consent to alice's account, it is hers.
        let consent = DeviceCertificate::consent(b.device_signing_key(), &a.user_id(), &dh);
        let cert = a.certify(&b.device_id(), dh, consent, 5).unwrap();
        cert.verify().unwrap();
        assert_eq!(cert.account_dh, a.certificate().account_dh);
    }

    #[test]
    fn a_handout_key_is_signed_by_its_device() {
        let a = alice();
        let key = HandoutKey::issue(a.device_signing_key(), [9; 32], 5);
        key.verify().unwrap();
        let mut moved = key.clone();
        moved.dh[0] ^= 1;
        assert!(moved.verify().is_err());
        let mut claimed = key;
        claimed.device = Identity::from_seed(b"bob", 1).unwrap().device_id();
        assert!(claimed.verify().is_err());
    }

    #[test]
    fn one_time_keys_are_signed_for_their_holder() {
        let a = alice();
        let bob = Identity::from_seed(b"bob", 1).unwrap().device_id();
        let keys =
            OneTimeKeys::issue(a.device_signing_key(), bob, vec![[1; 32], [2; 32]], 5).unwrap();
        keys.verify().unwrap();
        let mut other_holder = keys.clone();
        other_holder.holder = a.device_id();
        assert!(other_holder.verify().is_err());
        let mut fewer = keys.clone();
        fewer.keys.pop();
        assert!(fewer.verify().is_err());
        let mut too_many = keys;
        too_many.keys = vec![[3; 32]; MAX_ONE_TIME_KEYS + 1];
        assert!(too_many.verify().is_err());
        assert!(OneTimeKeys::issue(a.device_signing_key(), bob, Vec::new(), 5).is_err());
    }

    #[test]
    fn revocation_verifies_and_detects_forgery() {
        let a = alice();
        let stolen = DeviceId([9; 32]);
        let rev = a.revoke(&stolen, 5).unwrap();
        rev.verify().unwrap();
        assert_eq!(rev.user, a.user_id());
        for tamper in 0..3 {
            let mut forged = rev.clone();
            match tamper {
                0 => forged.device.0[0] ^= 1,
                1 => forged.revoked_at_ms += 1,
                _ => forged.user = Identity::from_seed(b"mallory", 0).unwrap().user_id(),
            }
            assert!(forged.verify().is_err(), "tamper {tamper}");
        }
    }

    #[test]
    fn secrets_round_trip() {
        let a = alice();
        let b = Identity::from_secrets(&a.secrets(), Some(a.certificate().clone()), 0).unwrap();
        assert_eq!(a.device_id(), b.device_id());
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(
            a.peer_id(),
            a.libp2p_keypair().unwrap().public().to_peer_id()
        );
    }

    #[test]
    fn invite_round_trips_and_catches_typos() {
        let a = alice();
        let addrs = vec!["/ip4/127.0.0.1/tcp/1".to_string()];
        let text = a
            .invite("Alice", vec![a.certificate().clone()], addrs.clone(), 5)
            .unwrap();
        assert!(text.starts_with("weft1"));
        let inv = Invite::decode(&text).unwrap();
        assert_eq!(
            (inv.name.as_str(), inv.user, inv.addrs.clone()),
            ("Alice", a.user_id(), addrs)
        );
        // Upper case and line breaks are fine.
        let wrapped = format!("{}\n{}", &text[..40].to_uppercase(), &text[40..]);
        assert_eq!(Invite::decode(&wrapped).unwrap(), inv);
        // One changed character is caught.
        for i in [5usize, 20, text.len() - 3] {
            let mut chars: Vec<char> = text.chars().collect();
            chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
            let typo: String = chars.into_iter().collect();
            assert!(Invite::decode(&typo).is_err(), "typo at {i} accepted");
        }
        assert!(matches!(
            Invite::decode("hello"),
            Err(IdentityError::InviteNotWeft)
        ));
        assert!(Invite::decode(&text[..text.len() - 5]).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("Alice").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("  ").is_err());
        assert!(validate_name("a\u{7}b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
        assert!(validate_name("Zoë 👩‍💻 نور").is_ok());
        for spoof in [
            "\u{1b}]52;c;eA==\u{7}Mal",
            "Mal\u{9b}31m",
            "Mal\u{202e}lory",
            "\u{2066}Alice\u{2069}",
            "Bob\u{200f}",
            "Bob\u{061c}",
            "Bob\u{2028}Alice",
        ] {
            assert!(validate_name(spoof).is_err(), "{spoof:?}");
        }
    }

    proptest! {
        #[test]
        fn invite_decoder_never_panics(s in ".{0,300}") {
            let _ = Invite::decode(&s);
        }

        #[test]
        fn invite_decoder_survives_corrupt_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let text = format!("weft1{}", data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase());
            let _ = Invite::decode(&text);
        }
    }
}
