//! The wire side of identities: device certificates (an account's user
//! key vouches for a device, the device key consents), revocations,
//! handout and one-time keys, invites and display names. What a node
//! holds secret (its keys) is the node's `identity` module.
//!
//! An account is an ed25519 user key and an X25519 account key that all
//! its devices hold (routing secrets of its one-to-one conversations
//! derive from it, see [`crate::routing`]). Each device has its own
//! ed25519 device key (its libp2p peer id derives from it) and an X25519
//! key for receiving sealed keys. A [`DeviceCertificate`] binds them: the
//! user key signs (user, device, DH key, account key) and the device key
//! signs its consent to (user, device, DH key), so no account can claim
//! another's device. An [`Invite`] is the one string a person hands to
//! another: the user key, the device certificates, the display name and
//! address hints, signed by the user key and protected by a checksum.

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, UserId};

/// Longest display name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 64;
/// Most devices one account may certify.
pub const MAX_DEVICES: usize = 16;
/// Most address hints an invite carries, and the longest one.
pub const MAX_INVITE_ADDRS: usize = 16;
pub const MAX_ADDR_LEN: usize = 256;
/// Longest invite string accepted (before decoding).
pub const MAX_INVITE_CHARS: usize = 16 * 1024;

const CERT_CONTEXT: &[u8] = b"weft v2 device certificate";
const CONSENT_CONTEXT: &[u8] = b"weft v2 device consent";
const REVOCATION_CONTEXT: &[u8] = b"weft v1 device revocation";
const HANDOUT_KEY_CONTEXT: &[u8] = b"weft v2 handout key";
const ONE_TIME_KEYS_CONTEXT: &[u8] = b"weft v2 one-time keys";
/// Most one-time keys one batch carries.
pub const MAX_ONE_TIME_KEYS: usize = 16;
const INVITE_CONTEXT: &[u8] = b"weft v2 invite";
/// The invite text's prefix names the string format (base32 with a
/// checksum); the version byte inside names the protocol.
const INVITE_PREFIX: &str = "weft1";
const INVITE_VERSION: u8 = 2;

/// What can go wrong with keys, certificates and invites.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invite does not start with \"{INVITE_PREFIX}\": not a Weft invite")]
    InviteNotWeft,
    #[error("invite is not valid base32 (a character was mistyped or cut off)")]
    InviteEncoding,
    #[error("invite checksum does not match (a character was mistyped or cut off)")]
    InviteChecksum,
    #[error(
        "invite version {0} is not supported by this version of Weft (an invite made before protocol 2: ask for a new one)"
    )]
    InviteVersion(u8),
    #[error("invite is too long ({0} characters, at most {MAX_INVITE_CHARS})")]
    InviteTooLong(usize),
    #[error("invite is malformed: {0}")]
    InviteMalformed(&'static str),
    #[error("signature does not verify: {0}")]
    BadSignature(&'static str),
    #[error(
        "display name must be 1 to {MAX_NAME_BYTES} bytes, with no control or text-direction characters"
    )]
    BadName,
    #[error("malformed key or certificate: {0}")]
    Malformed(&'static str),
    #[error("the operating system's random number generator failed")]
    Random,
    #[error("not a valid link code: {0}")]
    LinkCode(&'static str),
    #[error(
        "this device was linked under protocol 1 and holds no account key: link it again (`weft init --link`)"
    )]
    LinkedBeforeV2,
}

/// Fills a buffer from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|_| IdentityError::Random)?;
    Ok(out)
}

/// Checks a display name: non-empty, bounded, no character that changes
/// how text is shown (see [`is_display_control`]).
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(is_display_control) {
        return Err(IdentityError::BadName);
    }
    Ok(())
}

/// Whether `c` acts on the text around it instead of showing as itself: a
/// control character (C0, DEL, C1: ESC starts terminal commands), a bidi
/// control (marks, embeddings, overrides, isolates: they reorder what is
/// shown) or a line or paragraph separator. Any of them lets text pass for
/// other text.
pub fn is_display_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The libp2p peer id of a device: derived from its ed25519 public key.
pub fn peer_id_of(device: &DeviceId) -> PeerId {
    match libp2p_identity::ed25519::PublicKey::try_from_bytes(&device.0) {
        Ok(pk) => PeerId::from_public_key(&libp2p_identity::PublicKey::from(pk)),
        // Not a curve point: no real device has this id; wrap it as an
        // identity multihash (code 0, 32 bytes) so the caller still gets a
        // (never reachable) peer id instead of a panic.
        Err(_) => {
            let mut multihash = vec![0x00, 0x20];
            multihash.extend_from_slice(&device.0);
            PeerId::from_bytes(&multihash).unwrap_or_else(|_| PeerId::random())
        }
    }
}

/// The statement, signed by both keys, that a device (and its DH key)
/// belongs to an account: the user key vouches for the device, and the
/// device key consents to the account (without it, any account could
/// certify someone else's device under its own name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCertificate {
    pub user: UserId,
    pub device: DeviceId,
    /// The device's X25519 public key: sealed keys are addressed to it.
    pub dh: [u8; 32],
    /// The account's X25519 public key (the same in all its certificates).
    pub account_dh: [u8; 32],
    pub created_at_ms: i64,
    /// The user key's signature.
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
    /// The device key's signature over (user, device, dh).
    #[serde(with = "sig_bytes")]
    pub consent: [u8; 64],
}

impl DeviceCertificate {
    /// The device key's consent to belong to `user`, with DH key `dh`.
    pub fn consent(device_key: &SigningKey, user: &UserId, dh: &[u8; 32]) -> [u8; 64] {
        let device = DeviceId(device_key.verifying_key().to_bytes());
        device_key
            .sign(&Self::consent_bytes(user, &device, dh))
            .to_bytes()
    }

    /// Certifies `device` for the user key's account. Refuses a consent
    /// the device key did not sign.
    pub fn issue(
        user_key: &SigningKey,
        device: &DeviceId,
        dh: [u8; 32],
        account_dh: [u8; 32],
        consent: [u8; 64],
        now_ms: i64,
    ) -> Result<Self, IdentityError> {
        let user = UserId(user_key.verifying_key().to_bytes());
        let msg = Self::signed_bytes(&user, device, &dh, &account_dh, now_ms);
        let cert = Self {
            user,
            device: *device,
            dh,
            account_dh,
            created_at_ms: now_ms,
            signature: user_key.sign(&msg).to_bytes(),
            consent,
        };
        cert.verify()?;
        Ok(cert)
    }

    fn signed_bytes(
        user: &UserId,
        device: &DeviceId,
        dh: &[u8; 32],
        account_dh: &[u8; 32],
        at: i64,
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(CERT_CONTEXT.len() + 136);
        m.extend_from_slice(CERT_CONTEXT);
        m.extend_from_slice(&user.0);
        m.extend_from_slice(&device.0);
        m.extend_from_slice(dh);
        m.extend_from_slice(account_dh);
        m.extend_from_slice(&at.to_be_bytes());
        m
    }

    fn consent_bytes(user: &UserId, device: &DeviceId, dh: &[u8; 32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(CONSENT_CONTEXT.len() + 96);
        m.extend_from_slice(CONSENT_CONTEXT);
        m.extend_from_slice(&user.0);
        m.extend_from_slice(&device.0);
        m.extend_from_slice(dh);
        m
    }

    /// Checks that the user key signed this certificate and that the
    /// device key consented to it.
    pub fn verify(&self) -> Result<(), IdentityError> {
        let msg = Self::signed_bytes(
            &self.user,
            &self.device,
            &self.dh,
            &self.account_dh,
            self.created_at_ms,
        );
        verify(&self.user.0, &msg, &self.signature)
            .map_err(|_| IdentityError::BadSignature("device certificate"))?;
        let consent = Self::consent_bytes(&self.user, &self.device, &self.dh);
        verify(&self.device.0, &consent, &self.consent).map_err(|_| {
            IdentityError::BadSignature("device certificate without the device's consent")
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a certificate from this device's own store, where only
    /// verified certificates are ever written: skips the signature check.
    pub fn from_stored_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        postcard::from_bytes(bytes).map_err(|_| IdentityError::Malformed("device certificate"))
    }

    /// Decodes and verifies a certificate.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let cert: Self = postcard::from_bytes(bytes)
            .map_err(|_| IdentityError::Malformed("device certificate"))?;
        cert.verify()?;
        Ok(cert)
    }
}

/// The user key's statement that a device no longer belongs to the
/// account: nothing it sends is accepted and nothing is sent to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub user: UserId,
    pub device: DeviceId,
    pub revoked_at_ms: i64,
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
}

impl Revocation {
    pub fn issue(user_key: &SigningKey, device: &DeviceId, now_ms: i64) -> Self {
        let user = UserId(user_key.verifying_key().to_bytes());
        let msg = Self::signed_bytes(&user, device, now_ms);
        Self {
            user,
            device: *device,
            revoked_at_ms: now_ms,
            signature: user_key.sign(&msg).to_bytes(),
        }
    }

    fn signed_bytes(user: &UserId, device: &DeviceId, at: i64) -> Vec<u8> {
        let mut m = Vec::with_capacity(REVOCATION_CONTEXT.len() + 72);
        m.extend_from_slice(REVOCATION_CONTEXT);
        m.extend_from_slice(&user.0);
        m.extend_from_slice(&device.0);
        m.extend_from_slice(&at.to_be_bytes());
        m
    }

    /// Checks that the user key signed this revocation.
    pub fn verify(&self) -> Result<(), IdentityError> {
        let msg = Self::signed_bytes(&self.user, &self.device, self.revoked_at_ms);
        verify(&self.user.0, &msg, &self.signature)
            .map_err(|_| IdentityError::BadSignature("device revocation"))
    }
}

/// A device's current X25519 key for what is sealed to it (key handouts,
/// group states), signed by its device key. Devices replace it on a timer
/// and erase the secret a while after: a later copy of the device then
/// opens no handout sealed to an old one. The certified DH key is only the
/// fallback for senders who know no handout key of the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoutKey {
    pub device: DeviceId,
    pub dh: [u8; 32],
    pub created_at_ms: i64,
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
}

impl HandoutKey {
    pub fn issue(device_key: &SigningKey, dh: [u8; 32], now_ms: i64) -> Self {
        let device = DeviceId(device_key.verifying_key().to_bytes());
        let msg = Self::signed_bytes(&device, &dh, now_ms);
        Self {
            device,
            dh,
            created_at_ms: now_ms,
            signature: device_key.sign(&msg).to_bytes(),
        }
    }

    fn signed_bytes(device: &DeviceId, dh: &[u8; 32], at: i64) -> Vec<u8> {
        let mut m = Vec::with_capacity(HANDOUT_KEY_CONTEXT.len() + 72);
        m.extend_from_slice(HANDOUT_KEY_CONTEXT);
        m.extend_from_slice(&device.0);
        m.extend_from_slice(dh);
        m.extend_from_slice(&at.to_be_bytes());
        m
    }

    /// Checks that the device key signed it.
    pub fn verify(&self) -> Result<(), IdentityError> {
        let msg = Self::signed_bytes(&self.device, &self.dh, self.created_at_ms);
        verify(&self.device.0, &msg, &self.signature)
            .map_err(|_| IdentityError::BadSignature("handout key"))
    }
}

/// One-time handout keys that a device (the issuer) gives one other
/// device (the holder), signed by the issuer's device key. The holder
/// seals one key handout to each and then forgets it; the issuer erases a
/// key's secret as soon as the handout sealed to it opens, so a copy of
/// the issuer taken after that opens the handout with nothing it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimeKeys {
    pub issuer: DeviceId,
    pub holder: DeviceId,
    /// Strictly increasing per (issuer, holder): a holder takes a batch
    /// only if it is newer than the last, so a replayed batch cannot hand
    /// it keys it already used.
    pub created_at_ms: i64,
    /// X25519 public keys, at most [`MAX_ONE_TIME_KEYS`].
    pub keys: Vec<[u8; 32]>,
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
}

impl OneTimeKeys {
    pub fn issue(
        device_key: &SigningKey,
        holder: DeviceId,
        keys: Vec<[u8; 32]>,
        now_ms: i64,
    ) -> Result<Self, IdentityError> {
        if keys.is_empty() || keys.len() > MAX_ONE_TIME_KEYS {
            return Err(IdentityError::Malformed("number of one-time keys"));
        }
        let issuer = DeviceId(device_key.verifying_key().to_bytes());
        let msg = Self::signed_bytes(&issuer, &holder, now_ms, &keys);
        Ok(Self {
            issuer,
            holder,
            created_at_ms: now_ms,
            keys,
            signature: device_key.sign(&msg).to_bytes(),
        })
    }

    fn signed_bytes(issuer: &DeviceId, holder: &DeviceId, at: i64, keys: &[[u8; 32]]) -> Vec<u8> {
        let mut m = Vec::with_capacity(ONE_TIME_KEYS_CONTEXT.len() + 76 + 32 * keys.len());
        m.extend_from_slice(ONE_TIME_KEYS_CONTEXT);
        m.extend_from_slice(&issuer.0);
        m.extend_from_slice(&holder.0);
        m.extend_from_slice(&at.to_be_bytes());
        // At most MAX_ONE_TIME_KEYS once verified; saturated otherwise.
        m.extend_from_slice(&u32::try_from(keys.len()).unwrap_or(u32::MAX).to_be_bytes());
        for key in keys {
            m.extend_from_slice(key);
        }
        m
    }

    /// Checks the number of keys and that the issuer's device key signed
    /// them.
    pub fn verify(&self) -> Result<(), IdentityError> {
        if self.keys.is_empty() || self.keys.len() > MAX_ONE_TIME_KEYS {
            return Err(IdentityError::Malformed("number of one-time keys"));
        }
        let msg = Self::signed_bytes(&self.issuer, &self.holder, self.created_at_ms, &self.keys);
        verify(&self.issuer.0, &msg, &self.signature)
            .map_err(|_| IdentityError::BadSignature("one-time keys"))
    }
}

/// What signs in a device's name: its device key, and the certificate
/// that binds it to its account (the node's `Identity`).
pub trait DeviceSigner {
    fn certificate(&self) -> &DeviceCertificate;
    fn device_signing_key(&self) -> &SigningKey;
}

/// Verifies an ed25519 signature made by `public` over `msg` (strict:
/// rejects malleable and small-order forms).
pub fn verify(public: &[u8; 32], msg: &[u8], signature: &[u8; 64]) -> Result<(), IdentityError> {
    let key =
        VerifyingKey::from_bytes(public).map_err(|_| IdentityError::Malformed("public key"))?;
    key.verify_strict(msg, &Signature::from_bytes(signature))
        .map_err(|_| IdentityError::BadSignature("ed25519"))
}

/// What an invite says, signed by the user key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    pub name: String,
    pub user: UserId,
    pub devices: Vec<DeviceCertificate>,
    /// Multiaddrs (with /p2p/ suffix) where the user's devices were last
    /// reachable: hints, not promises.
    pub addrs: Vec<String>,
    pub created_at_ms: i64,
}

impl Invite {
    /// A signed invite (the node's `Identity::invite` makes one).
    pub fn create(
        user_key: &SigningKey,
        name: &str,
        devices: Vec<DeviceCertificate>,
        mut addrs: Vec<String>,
        now_ms: i64,
    ) -> Result<Self, IdentityError> {
        validate_name(name)?;
        addrs.retain(|a| a.len() <= MAX_ADDR_LEN);
        addrs.truncate(MAX_INVITE_ADDRS);
        let invite = Self {
            name: name.to_owned(),
            user: UserId(user_key.verifying_key().to_bytes()),
            devices,
            addrs,
            created_at_ms: now_ms,
        };
        invite.check_contents()?;
        Ok(invite)
    }

    fn check_contents(&self) -> Result<(), IdentityError> {
        validate_name(&self.name)?;
        if self.devices.is_empty() || self.devices.len() > MAX_DEVICES {
            return Err(IdentityError::InviteMalformed("wrong number of devices"));
        }
        if self.addrs.len() > MAX_INVITE_ADDRS || self.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN)
        {
            return Err(IdentityError::InviteMalformed(
                "too many or too long addresses",
            ));
        }
        for cert in &self.devices {
            if cert.user != self.user {
                return Err(IdentityError::InviteMalformed("device of another user"));
            }
            cert.verify()?;
        }
        Ok(())
    }

    /// The invite as one copy-paste string: `weft1` + base32 of
    /// version | len(u16 BE) | postcard(invite) | signature(64) | checksum(4).
    pub fn encode_with(&self, user_key: &SigningKey) -> String {
        let body = postcard::to_stdvec(self).unwrap_or_default();
        let mut raw = Vec::with_capacity(body.len() + 71);
        raw.push(INVITE_VERSION);
        raw.extend_from_slice(&(body.len() as u16).to_be_bytes());
        raw.extend_from_slice(&body);
        let mut signed = INVITE_CONTEXT.to_vec();
        signed.extend_from_slice(&body);
        raw.extend_from_slice(&user_key.sign(&signed).to_bytes());
        let check = blake3::hash(&raw);
        raw.extend_from_slice(&check.as_bytes()[..4]);
        format!(
            "{INVITE_PREFIX}{}",
            BASE32_NOPAD.encode(&raw).to_ascii_lowercase()
        )
    }

    /// Parses and verifies an invite string. Whitespace is ignored, so an
    /// invite wrapped by a terminal or mail client still works.
    pub fn decode(text: &str) -> Result<Self, IdentityError> {
        if text.len() > MAX_INVITE_CHARS {
            return Err(IdentityError::InviteTooLong(text.len()));
        }
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let lower = compact.to_ascii_lowercase();
        let rest = lower
            .strip_prefix(INVITE_PREFIX)
            .ok_or(IdentityError::InviteNotWeft)?;
        let raw = BASE32_NOPAD
            .decode(rest.to_ascii_uppercase().as_bytes())
            .map_err(|_| IdentityError::InviteEncoding)?;
        if raw.len() < 1 + 2 + 64 + 4 {
            return Err(IdentityError::InviteMalformed("too short"));
        }
        let (content, check) = raw.split_at(raw.len() - 4);
        if &blake3::hash(content).as_bytes()[..4] != check {
            return Err(IdentityError::InviteChecksum);
        }
        if content[0] != INVITE_VERSION {
            return Err(IdentityError::InviteVersion(content[0]));
        }
        let len = u16::from_be_bytes([content[1], content[2]]) as usize;
        if content.len() != 3 + len + 64 {
            return Err(IdentityError::InviteMalformed(
                "length field does not match",
            ));
        }
        let body = &content[3..3 + len];
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&content[3 + len..]);
        let invite: Invite =
            postcard::from_bytes(body).map_err(|_| IdentityError::InviteMalformed("body"))?;
        let mut signed = INVITE_CONTEXT.to_vec();
        signed.extend_from_slice(body);
        verify(&invite.user.0, &signed, &sig)
            .map_err(|_| IdentityError::BadSignature("invite is not signed by its user key"))?;
        invite.check_contents()?;
        Ok(invite)
    }
}

/// serde for `[u8; 64]` (serde derives arrays only up to 32).
pub mod sig_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes: &[u8] = <&[u8]>::deserialize(d)?;
        <[u8; 64]>::try_from(bytes)
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"64"))
    }
}
