//! Envelope crypto against its bare primitives, on the same core.
//!
//! - `seal+sign`: `SendingChain::step` + `envelope::seal_chain` on a
//!   200-byte message (BLAKE3 key derivation, postcard header, AEAD with
//!   the header as associated data, ed25519 signature over context+header+
//!   ciphertext), versus bare XChaCha20-Poly1305 encrypt of 200 bytes plus
//!   an ed25519 signature over the ciphertext.
//! - `verify+open`: `Envelope::decode` + `verify` +
//!   `ReceivingChain::key_for` + `open_chain`, versus bare `verify_strict` (key already parsed) plus
//!   decrypt.
//!
//! Criterion reports absolute times. The ratios are measured separately in
//! the same run, interleaving short blocks of the real path and of the
//! baseline so that machine noise hits both alike; the median per-block
//! ratio is printed as `ratio ... = x` (rate ratio: real rate / bare rate,
//! 1.0 = as fast as the bare primitives). Target: at least 0.80.
//!
//! `cargo bench -p weft-node --bench crypto -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use criterion::Criterion;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use weft_node::crypto::chain::{ReceivingChain, SendingChain};
use weft_node::crypto::envelope::{self, Envelope};
use weft_node::ids::RoutingTag;

const MESSAGE_BYTES: usize = 200;
const TARGET_RATIO: f64 = 0.80;

struct Fixture {
    signer: SigningKey,
    verifying: VerifyingKey,
    conversation: RoutingTag,
    message: Vec<u8>,
    sending: SendingChain,
    /// One chain envelope and the receiving chain positioned at its counter.
    /// `key_for` does not change the chain, so it can be opened repeatedly.
    wire: Vec<u8>,
    receiving: ReceivingChain,
    counter: u64,
    bare_key: [u8; 32],
    bare_nonce: [u8; 24],
    bare_ct: Vec<u8>,
    bare_sig: Signature,
}

impl Fixture {
    fn new() -> Self {
        let signer = SigningKey::from_bytes(&[7; 32]);
        let verifying = signer.verifying_key();
        let conversation = RoutingTag([42; 16]);
        let message: Vec<u8> = (0..MESSAGE_BYTES).map(|i| (i % 251) as u8).collect();
        let mut opener = SendingChain::new([5; 32]);
        let (ck, at) = opener.distribution();
        let (counter, mk) = opener.step().unwrap();
        let env = envelope::seal_chain(&signer, conversation, 1, counter, &mk, &message).unwrap();
        let bare_key = [9; 32];
        let bare_nonce = [3; 24];
        let bare_ct = bare_encrypt(&bare_key, &bare_nonce, &message);
        let bare_sig = signer.sign(&bare_ct);
        Self {
            signer,
            verifying,
            conversation,
            message,
            sending: SendingChain::new([6; 32]),
            wire: env.into_bytes(),
            receiving: ReceivingChain::new(ck, at),
            counter,
            bare_key,
            bare_nonce,
            bare_ct,
            bare_sig,
        }
    }

    fn real_seal(&mut self) -> Envelope {
        let (counter, mk) = self.sending.step().unwrap();
        envelope::seal_chain(
            &self.signer,
            self.conversation,
            1,
            counter,
            &mk,
            &self.message,
        )
        .unwrap()
    }

    fn real_open(&self) -> Vec<u8> {
        let env = Envelope::decode(&self.wire).unwrap();
        env.verify().unwrap();
        let (mk, after) = self
            .receiving
            .key_for(self.counter, 0, Duration::from_secs(30 * 24 * 3600))
            .unwrap();
        let pt = env.open_chain(&mk).unwrap();
        black_box(after);
        pt
    }

    fn bare_seal(&self) -> (Vec<u8>, Signature) {
        let ct = bare_encrypt(&self.bare_key, &self.bare_nonce, &self.message);
        let sig = self.signer.sign(&ct);
        (ct, sig)
    }

    fn bare_open(&self) -> Vec<u8> {
        self.verifying
            .verify_strict(&self.bare_ct, &self.bare_sig)
            .unwrap();
        XChaCha20Poly1305::new(&Key::from(self.bare_key))
            .decrypt(
                &XNonce::from(self.bare_nonce),
                Payload {
                    msg: &self.bare_ct,
                    aad: &[],
                },
            )
            .unwrap()
    }
}

fn bare_encrypt(key: &[u8; 32], nonce: &[u8; 24], msg: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new(&Key::from(*key))
        .encrypt(&XNonce::from(*nonce), Payload { msg, aad: &[] })
        .unwrap()
}

fn criterion_benches(c: &mut Criterion, f: &mut Fixture) {
    let mut g = c.benchmark_group("seal+sign 200B");
    g.bench_function("weft (step + seal_chain)", |b| {
        b.iter(|| black_box(f.real_seal()))
    });
    g.bench_function("bare (xchacha encrypt + ed25519 sign)", |b| {
        b.iter(|| black_box(f.bare_seal()))
    });
    g.finish();
    let mut g = c.benchmark_group("verify+open 200B");
    g.bench_function("weft (decode + verify + key_for + open_chain)", |b| {
        b.iter(|| black_box(f.real_open()))
    });
    g.bench_function("bare (verify_strict + xchacha decrypt)", |b| {
        b.iter(|| black_box(f.bare_open()))
    });
    g.finish();
}

/// Time of `block` calls of `op`, per call.
fn per_call(block: u32, mut op: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..block {
        op();
    }
    start.elapsed() / block
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Interleaved paired measurement: rounds of (real block, bare block),
/// alternating which goes first. Returns (real ns, bare ns, bare/real).
fn paired(
    rounds: usize,
    block: u32,
    mut real: impl FnMut(),
    mut bare: impl FnMut(),
) -> (f64, f64, f64) {
    let (mut r_ns, mut b_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let (r, b) = if i % 2 == 0 {
            let r = per_call(block, &mut real);
            (r, per_call(block, &mut bare))
        } else {
            let b = per_call(block, &mut bare);
            (per_call(block, &mut real), b)
        };
        let (r, b) = (r.as_nanos() as f64, b.as_nanos() as f64);
        r_ns.push(r);
        b_ns.push(b);
        ratios.push(b / r);
    }
    (median(&mut r_ns), median(&mut b_ns), median(&mut ratios))
}

fn report(name: &str, (real, bare, ratio): (f64, f64, f64)) {
    let verdict = if ratio >= TARGET_RATIO {
        "PASS"
    } else {
        "FAIL"
    };
    println!(
        "{name}: weft {:.2} us, bare {:.2} us (median of interleaved blocks)",
        real / 1e3,
        bare / 1e3
    );
    println!(
        "ratio {name} / bare = {ratio:.2} (rate, weft/bare; target >= {TARGET_RATIO:.2}: {verdict})"
    );
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    let mut f = Fixture::new();
    // Sanity: both paths really round-trip.
    let env = f.real_seal();
    assert_eq!(Envelope::decode(env.bytes()).unwrap().header, env.header);
    assert_eq!(f.real_open(), f.message);
    assert_eq!(f.bare_open(), f.message);

    criterion_benches(&mut c, &mut f);
    c.final_summary();

    let (rounds, block) = if benchmarking { (200, 200) } else { (3, 10) };
    println!();
    let seal = {
        let f = std::cell::RefCell::new(&mut f);
        paired(
            rounds,
            block,
            || {
                black_box(f.borrow_mut().real_seal());
            },
            || {
                black_box(f.borrow().bare_seal());
            },
        )
    };
    report("seal+sign", seal);
    let open = paired(
        rounds,
        block,
        || {
            black_box(f.real_open());
        },
        || {
            black_box(f.bare_open());
        },
    );
    report("verify+open", open);
    // Where the verify+open gap goes: the real path parses the sender's key
    // from the header on every envelope; the bare baseline has it parsed.
    let key = f.verifying.to_bytes();
    let mut parse: Vec<f64> = (0..rounds)
        .map(|_| {
            per_call(block, || {
                black_box(VerifyingKey::from_bytes(black_box(&key)).unwrap());
            })
            .as_nanos() as f64
        })
        .collect();
    println!(
        "  of which VerifyingKey::from_bytes (point decompression, not in bare): {:.2} us",
        median(&mut parse) / 1e3
    );
}
