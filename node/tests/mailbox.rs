//! The mailbox protocol's registrations, made and checked with real
//! device identities (`weft_proto::mailbox`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use weft_node::PeerId;
use weft_node::identity::Identity;
use weft_node::mailbox::{
    MailboxId, MailboxRequest, REGISTRATION_WINDOW_MS, Registration, RegistrationError,
};

fn setup() -> (Identity, PeerId) {
    let device = Identity::from_seed(b"mailbox/device", 0).unwrap();
    let relay = Identity::from_seed(b"mailbox/relay", 0).unwrap().peer_id();
    (device, relay)
}

#[test]
fn a_registration_verifies_at_its_relay_from_its_device() {
    let (device, relay) = setup();
    let r = Registration::new(
        &device,
        &relay,
        1_000,
        Some("https://push.example/x".into()),
        None,
    );
    let mailbox = r.verify(&relay, &device.peer_id(), 2_000).unwrap();
    assert_eq!(mailbox, MailboxId::of(&device.device_id(), &relay));
    // Round trip on the wire.
    let wire = MailboxRequest::Register(Box::new(r.clone())).encode();
    assert_eq!(
        MailboxRequest::decode(&wire),
        Some(MailboxRequest::Register(Box::new(r)))
    );
}

#[test]
fn forged_replayed_or_misdirected_registrations_fail() {
    let (device, relay) = setup();
    let other = Identity::from_seed(b"mailbox/other", 0).unwrap();
    let r = Registration::new(&device, &relay, 1_000, None, None);
    assert_eq!(
        r.verify(&other.peer_id(), &device.peer_id(), 1_000),
        Err(RegistrationError::OtherRelay)
    );
    assert_eq!(
        r.verify(&relay, &other.peer_id(), 1_000),
        Err(RegistrationError::OtherPeer)
    );
    assert_eq!(
        r.verify(
            &relay,
            &device.peer_id(),
            1_000 + REGISTRATION_WINDOW_MS + 1
        ),
        Err(RegistrationError::Stale)
    );
    let mut forged = r.clone();
    forged.wakeup = Some("https://evil.example/".into());
    assert_eq!(
        forged.verify(&relay, &device.peer_id(), 1_000),
        Err(RegistrationError::Signature)
    );
    let mut bad_url = Registration::new(&device, &relay, 1_000, Some("file:///etc".into()), None);
    assert_eq!(
        bad_url.verify(&relay, &device.peer_id(), 1_000),
        Err(RegistrationError::BadUrl)
    );
    // Someone else's certificate with this device's signature.
    bad_url.certificate = other.certificate().clone();
    assert!(bad_url.verify(&relay, &device.peer_id(), 1_000).is_err());
}

#[test]
fn mailbox_ids_differ_per_relay() {
    let (device, relay) = setup();
    let other = Identity::from_seed(b"mailbox/relay2", 0).unwrap().peer_id();
    assert_ne!(
        MailboxId::of(&device.device_id(), &relay),
        MailboxId::of(&device.device_id(), &other)
    );
}
