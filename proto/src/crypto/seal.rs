//! Sealing a 32-byte content key to many devices: X25519 between a fresh
//! ephemeral key and each recipient's certified DH key, HKDF-SHA256, and
//! XChaCha20-Poly1305 around the content key (32 + 16 bytes per recipient).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::CryptoError;

const SEAL_INFO: &[u8] = b"weft v1 seal";

/// Derives the key-encryption key and nonce for one recipient.
fn kek(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> ([u8; 32], [u8; 24]) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut okm = [0u8; 56];
    // 56 bytes is far below HKDF-SHA256's limit of 8160: this cannot fail.
    let _ = hk.expand(SEAL_INFO, &mut okm);
    let mut key = [0u8; 32];
    let mut nonce = [0u8; 24];
    key.copy_from_slice(&okm[..32]);
    nonce.copy_from_slice(&okm[32..]);
    okm.zeroize();
    (key, nonce)
}

/// Wraps `content_key` for the holder of `recipient_dh`. `aad` binds the
/// wrapped key to its envelope context.
pub fn wrap(
    ephemeral: &StaticSecret,
    recipient_dh: &[u8; 32],
    content_key: &[u8; 32],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let shared = ephemeral.diffie_hellman(&PublicKey::from(*recipient_dh));
    if !shared.was_contributory() {
        return Err(CryptoError::Malformed("recipient DH key is of low order"));
    }
    let eph_pub = PublicKey::from(ephemeral).to_bytes();
    let (mut key, nonce) = kek(shared.as_bytes(), &eph_pub, recipient_dh);
    let cipher = XChaCha20Poly1305::new(&Key::from(key));
    key.zeroize();
    cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: content_key,
                aad,
            },
        )
        .map_err(|_| CryptoError::Malformed("seal failed"))
}

/// Unwraps a content key sealed to `me`.
pub fn unwrap(
    me: &StaticSecret,
    ephemeral_pub: &[u8; 32],
    wrapped: &[u8],
    aad: &[u8],
) -> Result<[u8; 32], CryptoError> {
    let shared = me.diffie_hellman(&PublicKey::from(*ephemeral_pub));
    if !shared.was_contributory() {
        return Err(CryptoError::Decrypt);
    }
    let my_pub = PublicKey::from(me).to_bytes();
    let (mut key, nonce) = kek(shared.as_bytes(), ephemeral_pub, &my_pub);
    let cipher = XChaCha20Poly1305::new(&Key::from(key));
    key.zeroize();
    let mut plain = cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: wrapped, aad })
        .map_err(|_| CryptoError::Decrypt)?;
    let out = <[u8; 32]>::try_from(plain.as_slice()).map_err(|_| CryptoError::Decrypt);
    plain.zeroize();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_key() {
        let eph = StaticSecret::from([7u8; 32]);
        let bob = StaticSecret::from([8u8; 32]);
        let carol = StaticSecret::from([9u8; 32]);
        let bob_pub = PublicKey::from(&bob).to_bytes();
        let eph_pub = PublicKey::from(&eph).to_bytes();
        let w = wrap(&eph, &bob_pub, &[1; 32], b"ctx").unwrap();
        assert_eq!(w.len(), 48);
        assert_eq!(unwrap(&bob, &eph_pub, &w, b"ctx").unwrap(), [1; 32]);
        assert_eq!(
            unwrap(&carol, &eph_pub, &w, b"ctx"),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(
            unwrap(&bob, &eph_pub, &w, b"other"),
            Err(CryptoError::Decrypt)
        );
        assert!(wrap(&eph, &[0; 32], &[1; 32], b"ctx").is_err());
    }
}
