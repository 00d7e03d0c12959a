//! Linking a new device to an account.
//!
//! `weft devices link`, on a device that holds the user key (its daemon
//! running), makes a one-time [`LinkCode`]: the account's user id, where
//! the linking device listens, and a fresh 16-byte secret, as one string
//! `weftlink1…` with a checksum. `weft init --link CODE` on the new device
//! makes its device keys, dials the linking device, and asks over the
//! direct protocol for a certificate, proving it holds the code with
//! `blake3::keyed_hash(secret, "weft link v1" | device id | dh key)`. The
//! transport (noise) already proves that the asker holds the device key
//! whose peer id it connects with; the request also carries the device
//! key's consent to belong to the account (part of the certificate). The
//! linking device checks the proof, burns the code, certifies the new
//! device with the user key and answers with the certificate, the
//! account key (which every device of the account holds) and an invite for
//! the account. The secret never travels; a code works once, for 10
//! minutes.

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

use crate::identity::{DeviceCertificate, IdentityError};
use crate::ids::{DeviceId, UserId};

const LINK_PREFIX: &str = "weftlink1";
const LINK_VERSION: u8 = 2;
const PROOF_CONTEXT: &[u8] = b"weft link v1";
/// Longest code accepted.
const MAX_CODE_CHARS: usize = 4096;
/// Most address hints in a code.
const MAX_CODE_ADDRS: usize = 8;
/// How long a code may be used.
pub const CODE_LIFETIME_MS: i64 = 10 * 60 * 1000;

/// What a link code carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCode {
    pub user: UserId,
    /// The linking device.
    pub device: DeviceId,
    /// Where it listens (multiaddrs ending with its `/p2p/`).
    pub addrs: Vec<String>,
    pub secret: [u8; 16],
}

impl LinkCode {
    /// `weftlink1` + base32 of version | postcard(code) | checksum(4).
    pub fn encode(&self) -> String {
        let mut raw = vec![LINK_VERSION];
        raw.extend_from_slice(&postcard::to_stdvec(self).unwrap_or_default());
        let check = blake3::hash(&raw);
        raw.extend_from_slice(&check.as_bytes()[..4]);
        format!(
            "{LINK_PREFIX}{}",
            BASE32_NOPAD.encode(&raw).to_ascii_lowercase()
        )
    }

    /// Parses a code; whitespace is ignored. A typo fails the checksum.
    pub fn decode(text: &str) -> Result<Self, IdentityError> {
        let bad = IdentityError::LinkCode;
        if text.len() > MAX_CODE_CHARS {
            return Err(bad("too long"));
        }
        let compact: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        let rest = compact
            .strip_prefix(LINK_PREFIX)
            .ok_or(bad("it does not start with \"weftlink1\""))?;
        let raw = BASE32_NOPAD
            .decode(rest.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad("not base32"))?;
        if raw.len() < 1 + 4 {
            return Err(bad("too short"));
        }
        let (content, check) = raw.split_at(raw.len() - 4);
        if &blake3::hash(content).as_bytes()[..4] != check {
            return Err(bad("the checksum does not match (a typo?)"));
        }
        if content[0] != LINK_VERSION {
            return Err(bad("an unknown version"));
        }
        let code: Self = postcard::from_bytes(&content[1..]).map_err(|_| bad("malformed"))?;
        if code.addrs.len() > MAX_CODE_ADDRS || code.addrs.iter().any(|a| a.len() > 256) {
            return Err(bad("too many or too long addresses"));
        }
        Ok(code)
    }
}

/// The new device's proof that it holds the code's secret.
pub fn proof(secret: &[u8; 16], device: &DeviceId, dh: &[u8; 32]) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(secret);
    key[16..].copy_from_slice(&blake3::hash(secret).as_bytes()[..16]);
    let mut msg = PROOF_CONTEXT.to_vec();
    msg.extend_from_slice(&device.0);
    msg.extend_from_slice(dh);
    *blake3::keyed_hash(&key, &msg).as_bytes()
}

/// The new device's request (inside `DirectRequest::Link`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRequest {
    pub device: DeviceId,
    pub dh: [u8; 32],
    pub proof: [u8; 32],
    /// The device key's consent to belong to the code's account
    /// ([`DeviceCertificate::consent`]).
    #[serde(with = "crate::identity::sig_bytes")]
    pub consent: [u8; 64],
}

/// The linking device's answer (inside `DirectResponse::Linked`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkGrant {
    pub certificate: DeviceCertificate,
    /// The account's X25519 secret key, which all its devices hold. It
    /// travels only here, to the device that proved both the code and
    /// its key, inside the noise channel.
    pub account_dh: [u8; 32],
    /// The account's display name.
    pub name: String,
    /// An invite for the account naming its devices, signed by the user
    /// key: what `weft id` shows on a device without the user key.
    pub invite: String,
}

impl Drop for LinkGrant {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.account_dh);
    }
}

impl std::fmt::Debug for LinkGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkGrant")
            .field("certificate", &self.certificate)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code() -> LinkCode {
        LinkCode {
            user: UserId([1; 32]),
            device: DeviceId([2; 32]),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001/p2p/x".into()],
            secret: [3; 16],
        }
    }

    #[test]
    fn a_code_round_trips_and_a_typo_is_caught() {
        let text = code().encode();
        assert!(text.starts_with("weftlink1"));
        assert_eq!(LinkCode::decode(&text).ok(), Some(code()));
        let spaced = format!(" {}\n{} ", &text[..20], &text[20..]);
        assert_eq!(LinkCode::decode(&spaced).ok(), Some(code()));
        let mut typo: Vec<char> = text.chars().collect();
        let i = typo.len() / 2;
        typo[i] = if typo[i] == 'a' { 'b' } else { 'a' };
        let typo: String = typo.into_iter().collect();
        assert!(LinkCode::decode(&typo).is_err());
        assert!(LinkCode::decode("weft1abc").is_err());
        assert!(LinkCode::decode("").is_err());
    }

    #[test]
    fn the_proof_binds_the_secret_and_the_device() {
        let p = proof(&[3; 16], &DeviceId([4; 32]), &[5; 32]);
        assert_eq!(p, proof(&[3; 16], &DeviceId([4; 32]), &[5; 32]));
        assert_ne!(p, proof(&[9; 16], &DeviceId([4; 32]), &[5; 32]));
        assert_ne!(p, proof(&[3; 16], &DeviceId([6; 32]), &[5; 32]));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn random_text_never_panics(s in ".{0,300}") {
                let _ = LinkCode::decode(&s);
                let _ = LinkCode::decode(&format!("weftlink1{s}"));
            }
        }
    }
}
