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
use weft_node::identity::Revocation;
use weft_node::ids::{ConversationId, DeviceId, EnvelopeId};
use weft_node::mailbox::{MailboxId, MailboxRequest};
use weft_node::node::{ChainHave, DirectRequest, SyncRequest};
use weft_node::payload::{
    AccountChange, Annotate, EditText, Payload, Receipt, ReceiptKind, TextMessage,
};
use x25519_dalek::{PublicKey, StaticSecret};

const SENDER_SEED: [u8; 32] = [0x11; 32];
const RECIPIENT_DH_SEED: [u8; 32] = [0x22; 32];
const CHAIN_KEY: [u8; 32] = [0x33; 32];
const CONVERSATION: [u8; 32] = [0x44; 32];
const EPHEMERAL: [u8; 32] = [0x55; 32];
const CONTENT_KEY: [u8; 32] = [0x66; 32];
const RECIPIENT_DEVICE: [u8; 32] = [0x77; 32];

fn chain_vector() -> Vec<u8> {
    let signer = SigningKey::from_bytes(&SENDER_SEED);
    let mut chain = SendingChain::new(CHAIN_KEY);
    let (counter, mk) = chain.step().unwrap();
    seal_chain(
        &signer,
        ConversationId(CONVERSATION),
        1,
        counter,
        &mk,
        b"hello, weft",
    )
    .unwrap()
    .into_bytes()
}

fn sealed_vector() -> Vec<u8> {
    let signer = SigningKey::from_bytes(&SENDER_SEED);
    let dh = PublicKey::from(&StaticSecret::from(RECIPIENT_DH_SEED)).to_bytes();
    seal_to_devices(
        &signer,
        ConversationId(CONVERSATION),
        &[(DeviceId(RECIPIENT_DEVICE), dh)],
        EPHEMERAL,
        CONTENT_KEY,
        b"sealed key",
    )
    .unwrap()
    .into_bytes()
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
    let bytes = documented("chain-envelope-v1");
    assert_eq!(
        bytes,
        chain_vector(),
        "encoder changed: the wire format needs a new version"
    );
    let env = Envelope::decode(&bytes).unwrap();
    env.verify().unwrap();
    assert_eq!(env.header.version, 1);
    assert_eq!(env.header.conversation, ConversationId(CONVERSATION));
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
    let bytes = documented("sealed-envelope-v1");
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
        b"sealed key"
    );
}

#[test]
#[ignore = "prints vectors for docs/protocol.md"]
fn print() {
    let mut all = vec![
        ("chain-envelope-v1", chain_vector()),
        ("sealed-envelope-v1", sealed_vector()),
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
