//! End-to-end encryption. Pure: no I/O, no clock, no storage.
//!
//! - [`chain`]: per-sender, per-conversation key chains (sender keys): one
//!   message key per counter, the chain advancing per message.
//! - [`seal`]: sealing a content key to many devices with X25519 + HKDF.
//! - [`envelope`]: the one signed, encrypted envelope everything travels in.

pub mod chain;
pub mod envelope;
pub mod seal;

/// What can go wrong opening, sealing or verifying.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("envelope is malformed: {0}")]
    Malformed(&'static str),
    #[error(
        "envelope version {0} is not supported (this node speaks version 2; version 1 named the conversation in clear)"
    )]
    Version(u8),
    #[error("envelope is {0} bytes, more than the limit of {1}")]
    TooLarge(usize, usize),
    #[error("signature does not verify")]
    BadSignature,
    #[error("decryption failed (wrong key or tampered ciphertext)")]
    Decrypt,
    #[error("message key {0} was already used (replay) or is too old")]
    Replay(u64),
    #[error("the key of skipped message {0} has expired")]
    SkippedKeyExpired(u64),
    #[error("counter {counter} is {ahead} ahead of the chain; at most {max} may be skipped")]
    TooFarAhead { counter: u64, ahead: u64, max: u64 },
    #[error("this envelope is not sealed to this device")]
    NotARecipient,
    #[error("the chain is exhausted")]
    ChainExhausted,
    #[error("the operating system's random number generator failed")]
    Random,
}
