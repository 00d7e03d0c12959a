//! Wire-format test vectors: the hex blocks in docs/protocol.md must be
//! exactly what this version produces from the documented inputs, and
//! must decode, verify and open to the documented plaintexts.
//!
//! `cargo test -p weft-node --test vectors -- --ignored --nocapture print`
//! prints fresh vectors (after a deliberate wire change, with a version
//! bump).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ed25519_dalek::SigningKey;
use weft_node::crypto::chain::{ReceivingChain, SendingChain};
use weft_node::crypto::envelope::{Envelope, Sealing, seal_chain, seal_to_devices};
use weft_node::hlc::Hlc;
use weft_node::identity::{DeviceCertificate, HandoutKey, OneTimeKeys, Revocation};
use weft_node::ids::{ConversationId, DeviceId, EnvelopeId, RoutingTag, UserId};
use weft_node::mailbox::{MailboxId, MailboxRequest};
use weft_node::node::{ChainHave, DirectRequest, SyncRequest};
use weft_node::payload::{
    AccountChange, Annotate, EditText, Payload, Receipt, ReceiptKind, TextMessage,
};
use weft_node::routing::Routing;
use x25519_dalek::{PublicKey, StaticSecret};

const SENDER_SEED: [u8; 32] = [0x11; 32];
const RECIPIENT_DH_SEED: [u8; 32] = [0x22; 32];
const CHAIN_KEY: [u8; 32] = [0x33; 32];
const CONVERSATION: [u8; 32] = [0x44; 32];
const EPHEMERAL: [u8; 32] = [0x55; 32];
const CONTENT_KEY: [u8; 32] = [0x66; 32];
const RECIPIENT_DEVICE: [u8; 32] = [0x77; 32];
const TAG: [u8; 16] = [0x99; 16];
/// Device key seed and DH secret of the certified device, and the
/// account key secrets of two accounts (the sender's and the other's).
const DEVICE_SEED: [u8; 32] = [0x12; 32];
const ACCOUNT_A: [u8; 32] = [0xa1; 32];
const ACCOUNT_B: [u8; 32] = [0xb2; 32];
const USER_B_SEED: [u8; 32] = [0x13; 32];

fn chain_vector() -> Vec<u8> {
    let signer = SigningKey::from_bytes(&SENDER_SEED);
    let mut chain = SendingChain::new(CHAIN_KEY);
    let (counter, mk) = chain.step().unwrap();
    seal_chain(&signer, RoutingTag(TAG), 1, counter, &mk, b"hello, weft")
        .unwrap()
        .into_bytes()
}

fn sealed_vector() -> Vec<u8> {
    let signer = SigningKey::from_bytes(&SENDER_SEED);
    let dh = PublicKey::from(&StaticSecret::from(RECIPIENT_DH_SEED)).to_bytes();
    seal_to_devices(
        &signer,
        RoutingTag(TAG),
        ConversationId(CONVERSATION),
        &[(DeviceId(RECIPIENT_DEVICE), dh)],
        EPHEMERAL,
        CONTENT_KEY,
        b"sealed key",
    )
    .unwrap()
    .into_bytes()
}

fn user_id(seed: &[u8; 32]) -> UserId {
    UserId(SigningKey::from_bytes(seed).verifying_key().to_bytes())
}

/// The certificate user key `11` issues for device `12`, with the
/// device's consent.
fn certificate_vector() -> DeviceCertificate {
    let user_key = SigningKey::from_bytes(&SENDER_SEED);
    let device_key = SigningKey::from_bytes(&DEVICE_SEED);
    let device = DeviceId(device_key.verifying_key().to_bytes());
    let dh = PublicKey::from(&StaticSecret::from(RECIPIENT_DH_SEED)).to_bytes();
    let account_dh = PublicKey::from(&StaticSecret::from(ACCOUNT_A)).to_bytes();
    let consent = DeviceCertificate::consent(&device_key, &user_id(&SENDER_SEED), &dh);
    DeviceCertificate::issue(
        &user_key,
        &device,
        dh,
        account_dh,
        consent,
        1_700_000_000_000,
    )
    .unwrap()
}

/// The routing secret of the one-to-one conversation between the users
/// of seeds `11` (account key `a1`) and `13` (account key `b2`).
fn direct_routing_vector() -> Routing {
    Routing::direct(
        &StaticSecret::from(ACCOUNT_A),
        &user_id(&SENDER_SEED),
        &PublicKey::from(&StaticSecret::from(ACCOUNT_B)).to_bytes(),
        &user_id(&USER_B_SEED),
    )
    .unwrap()
}

/// Device `12`'s handout key: X25519 secret `a1` × 32's public key.
fn handout_key_payload() -> Payload {
    Payload::HandoutKey(HandoutKey::issue(
        &SigningKey::from_bytes(&DEVICE_SEED),
        PublicKey::from(&StaticSecret::from(ACCOUNT_A)).to_bytes(),
        1_700_000_000_000,
    ))
}

/// Device `12`'s one-time keys for device `77` × 32: the X25519 public
/// keys of secrets `a1` × 32 and `b2` × 32.
fn one_time_keys_payload() -> Payload {
    Payload::OneTimeKeys(vec![
        OneTimeKeys::issue(
            &SigningKey::from_bytes(&DEVICE_SEED),
            DeviceId(RECIPIENT_DEVICE),
            vec![
                PublicKey::from(&StaticSecret::from(ACCOUNT_A)).to_bytes(),
                PublicKey::from(&StaticSecret::from(ACCOUNT_B)).to_bytes(),
            ],
            1_700_000_000_000,
        )
        .unwrap(),
    ])
}

fn text_payload() -> Payload {
    Payload::Text(TextMessage {
        text: "hi".into(),
        reply_to: None,
        hlc: Hlc::new(1_700_000_000_000, 3),
        epoch: 1,
    })
}

fn receipt_payload() -> Payload {
    Payload::Receipt(Receipt {
        kind: ReceiptKind::Read,
        messages: vec![EnvelopeId([0xaa; 16])],
    })
}

fn annotate_payload() -> Payload {
    Payload::Annotate(Annotate {
        message: EnvelopeId([0xaa; 16]),
        period: 654,
        change: vec![1, 2, 3],
        edit: Some(EditText {
            id: [0xbb; 16],
            text: "hi".into(),
        }),
    })
}

fn revoked_payload() -> Payload {
    Payload::Revoked(Revocation::issue(
        &SigningKey::from_bytes(&SENDER_SEED),
        &DeviceId(RECIPIENT_DEVICE),
        1_700_000_000_000,
    ))
}

fn sync_request() -> DirectRequest {
    DirectRequest::Sync(SyncRequest {
        conversation: ConversationId(CONVERSATION),
        chains: vec![ChainHave {
            device: DeviceId(RECIPIENT_DEVICE),
            epoch: 1,
            ranges: vec![(0, 3), (5, 7)],
        }],
        sealed: vec![EnvelopeId([0xbb; 16])],
    })
}

fn deposit_request() -> MailboxRequest {
    MailboxRequest::Deposit {
        mailbox: MailboxId([0xcc; 16]),
        envelopes: vec![vec![1, 2, 3]],
    }
}

fn encoded_vectors() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("mailbox-deposit-v1", deposit_request().encode()),
        ("device-certificate-v2", certificate_vector().to_bytes()),
        ("payload-handout-key-v2", handout_key_payload().encode()),
        ("payload-one-time-keys-v2", one_time_keys_payload().encode()),
        ("direct-routing-v2", {
            let r = direct_routing_vector();
            let mut out = r.as_bytes().to_vec();
            out.extend_from_slice(&r.tag().0);
            out
        }),
        ("payload-text-v2", text_payload().encode()),
        ("payload-receipt-v1", receipt_payload().encode()),
        ("payload-annotate-v1", annotate_payload().encode()),
        ("payload-revoked-v1", revoked_payload().encode()),
        (
            "payload-account-v1",
            Payload::Account(AccountChange {
                change: vec![1, 2, 3],
            })
            .encode(),
        ),
        (
            "direct-sync-v1",
            postcard::to_stdvec(&sync_request()).unwrap(),
        ),
    ]
}

#[test]
fn payload_and_direct_vectors_match_and_decode() {
    for (name, bytes) in encoded_vectors() {
        assert_eq!(
            documented(name),
            bytes,
            "{name}: encoder changed: the wire format needs a new version"
        );
    }
    assert_eq!(
        Payload::decode(&documented("payload-text-v2")),
        Some(text_payload())
    );
    assert_eq!(
        Payload::decode(&documented("payload-receipt-v1")),
        Some(receipt_payload())
    );
    assert_eq!(
        Payload::decode(&documented("payload-annotate-v1")),
        Some(annotate_payload())
    );
    match Payload::decode(&documented("payload-revoked-v1")) {
        Some(Payload::Revoked(r)) => {
            r.verify().unwrap();
            assert_eq!(Payload::Revoked(r), revoked_payload());
        }
        other => panic!("payload-revoked-v1 decodes to {other:?}"),
    }
    assert_eq!(
        MailboxRequest::decode(&documented("mailbox-deposit-v1")),
        Some(deposit_request())
    );
    match Payload::decode(&documented("payload-handout-key-v2")) {
        Some(Payload::HandoutKey(k)) => {
            k.verify().unwrap();
            assert_eq!(Payload::HandoutKey(k), handout_key_payload());
        }
        other => panic!("payload-handout-key-v2 decodes to {other:?}"),
    }
    match Payload::decode(&documented("payload-one-time-keys-v2")) {
        Some(Payload::OneTimeKeys(batches)) => {
            for batch in &batches {
                batch.verify().unwrap();
            }
            assert_eq!(Payload::OneTimeKeys(batches), one_time_keys_payload());
        }
        other => panic!("payload-one-time-keys-v2 decodes to {other:?}"),
    }
    let cert = DeviceCertificate::from_bytes(&documented("device-certificate-v2")).unwrap();
    assert_eq!(cert, certificate_vector());
    // Without the device's consent, or with another's, it does not verify.
    let mut unconsented = cert.clone();
    unconsented.consent = [0; 64];
    assert!(unconsented.verify().is_err());
    // Both accounts derive the same secret; the topic follows from it.
    let other_side = Routing::direct(
        &StaticSecret::from(ACCOUNT_B),
        &user_id(&USER_B_SEED),
        &PublicKey::from(&StaticSecret::from(ACCOUNT_A)).to_bytes(),
        &user_id(&SENDER_SEED),
    )
    .unwrap();
    assert_eq!(other_side, direct_routing_vector());
    assert_eq!(
        other_side.topic(),
        "weft/2/".to_string()
            + &hex::encode(
                &blake3::derive_key("weft v2 gossip topic", other_side.as_bytes())[..20]
            )
    );
    let decoded: DirectRequest = postcard::from_bytes(&documented("direct-sync-v1")).unwrap();
    assert_eq!(
        postcard::to_stdvec(&decoded).unwrap(),
        postcard::to_stdvec(&sync_request()).unwrap()
    );
}

/// The hex block that follows the line `vector: NAME` in protocol.md.
fn documented(name: &str) -> Vec<u8> {
    let doc = include_str!("../../docs/protocol.md");
    let marker = format!("vector: {name}");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("no vector {name} in protocol.md"));
    let rest = &doc[start..];
    let open = rest.find("```hex").expect("hex block") + "```hex".len();
    let close = rest[open..].find("```").expect("end of hex block") + open;
    let hex: String = rest[open..close]
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    hex::decode(hex).expect("valid hex")
}

#[test]
fn chain_envelope_vector_matches_and_opens() {
    let bytes = documented("chain-envelope-v2");
    assert_eq!(
        bytes,
        chain_vector(),
        "encoder changed: the wire format needs a new version"
    );
    let env = Envelope::decode(&bytes).unwrap();
    env.verify().unwrap();
    assert_eq!(env.header.version, 2);
    assert_eq!(env.header.tag, RoutingTag(TAG));
    assert_eq!(
        env.header.sender.0,
        SigningKey::from_bytes(&SENDER_SEED)
            .verifying_key()
            .to_bytes()
    );
    assert_eq!(
        env.header.sealing,
        Sealing::Chain {
            epoch: 1,
            counter: 0
        }
    );
    let (mk, _) = ReceivingChain::new(CHAIN_KEY, 0)
        .key_for(0, 0, std::time::Duration::from_secs(3600))
        .unwrap();
    assert_eq!(env.open_chain(&mk).unwrap(), b"hello, weft");
}

#[test]
fn sealed_envelope_vector_matches_and_opens() {
    let bytes = documented("sealed-envelope-v2");
    assert_eq!(
        bytes,
        sealed_vector(),
        "encoder changed: the wire format needs a new version"
    );
    let env = Envelope::decode(&bytes).unwrap();
    env.verify().unwrap();
    let me = StaticSecret::from(RECIPIENT_DH_SEED);
    assert_eq!(
        env.open_sealed(&DeviceId(RECIPIENT_DEVICE), &me).unwrap(),
        (ConversationId(CONVERSATION), b"sealed key".to_vec())
    );
}

/// A version 1 envelope (its header named the conversation in clear) is
/// refused with the reason, never read as version 2.
#[test]
fn a_version_1_envelope_is_refused_with_its_version() {
    let v1 = documented("chain-envelope-v1");
    assert_eq!(v1[0], 1);
    let err = Envelope::decode(&v1).unwrap_err();
    assert_eq!(err, weft_node::crypto::CryptoError::Version(1));
    assert!(err.to_string().contains("version 1"), "{err}");
}

#[test]
#[ignore = "prints vectors for docs/protocol.md"]
fn print() {
    let mut all = vec![
        ("chain-envelope-v2", chain_vector()),
        ("sealed-envelope-v2", sealed_vector()),
    ];
    all.extend(encoded_vectors());
    for (name, bytes) in all {
        println!("vector: {name}\n```hex");
        for chunk in bytes.chunks(32) {
            println!("{}", hex::encode(chunk));
        }
        println!("```\n");
    }
}
