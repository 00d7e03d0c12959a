//! Real signed Weft envelopes for tests and benches: sealed with
//! weft-proto by a device key, as a node seals them (the relay cannot
//! open them; it checks their signature).

// Shared by several test and bench targets, each using part of it.
#![allow(dead_code, clippy::expect_used)]

use weft_node::crypto::chain::MessageKey;
use weft_node::crypto::envelope::seal_chain;
use weft_node::identity::Identity;
use weft_node::ids::RoutingTag;

/// A device that signs envelopes, seeded by `name`.
pub fn device(name: &str) -> Identity {
    Identity::from_seed(name.as_bytes(), 1_700_000_000_000).expect("a seeded identity")
}

/// Envelope number `n` from `sender`, `len` bytes long (or as short as
/// an envelope can be): the counter in its header makes each distinct.
pub fn sealed(sender: &Identity, n: u64, len: usize) -> Vec<u8> {
    // Version, tag, sender, sealing (variant, epoch, counter), the
    // ciphertext's length, its AEAD tag, the signature.
    let varint = |v: u64| (64 - v.max(1).leading_zeros()).div_ceil(7) as usize;
    let fixed = 1 + 16 + 32 + 1 + 1 + varint(n) + 16 + 64;
    let mut plaintext = len.saturating_sub(fixed + varint(len as u64));
    loop {
        let e = seal(sender, n, plaintext);
        match e.len().cmp(&len) {
            std::cmp::Ordering::Greater if plaintext > 0 => {
                plaintext = plaintext.saturating_sub(e.len() - len);
            }
            std::cmp::Ordering::Less if e.len() + 1 < len || plaintext == 0 => {
                plaintext += len - e.len();
            }
            _ => return e,
        }
    }
}

fn seal(sender: &Identity, n: u64, plaintext: usize) -> Vec<u8> {
    let key = MessageKey {
        key: [7; 32],
        nonce: [9; 24],
    };
    seal_chain(
        sender.device_signing_key(),
        RoutingTag([1; 16]),
        1,
        n,
        &key,
        &vec![0x5a; plaintext],
    )
    .expect("sealing")
    .into_bytes()
}

/// `sealed` with its last byte (the signature's) flipped: parses, does
/// not verify.
pub fn forged(sender: &Identity, n: u64, len: usize) -> Vec<u8> {
    let mut e = sealed(sender, n, len);
    if let Some(last) = e.last_mut() {
        *last ^= 1;
    }
    e
}
