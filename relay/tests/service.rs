//! The mailbox service against abuse: forged registrations, reading
//! someone else's mailbox, oversized and over-quota deposits, floods, and
//! the access modes. In-process, with a real store thread on an
//! in-memory database; identities are seeded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use weft_node::crypto::envelope::MAX_ENVELOPE_BYTES;
use weft_node::identity::Identity;
use weft_node::mailbox::{
    MAX_DEPOSIT, MailboxId, MailboxRequest, MailboxResponse, Refusal, Registration,
};
use weft_relay::config::Access;
use weft_relay::metrics::RelayMetrics;
use weft_relay::service::{Handled, Service, ServiceConfig};
use weft_relay::store::{Store, StoreHandle, StoreLimits};

const NOW: i64 = 1_700_000_000_000;

struct Fixture {
    service: Service,
    relay: PeerId,
    now: Instant,
    store: StoreHandle,
}

fn identity(name: &str) -> Identity {
    Identity::from_seed(name.as_bytes(), NOW).unwrap()
}

fn fixture_with(config: ServiceConfig, limits: StoreLimits) -> Fixture {
    let relay = Identity::from_seed(b"relay", NOW).unwrap().peer_id();
    let store = Store::open_in_memory(limits).unwrap();
    let store = StoreHandle::spawn(store, RelayMetrics::default()).unwrap();
    Fixture {
        service: Service::new(relay, config, store.clone(), RelayMetrics::default()),
        relay,
        now: Instant::now(),
        store,
    }
}

fn fixture() -> Fixture {
    fixture_with(ServiceConfig::default(), StoreLimits::default())
}

impl Fixture {
    async fn send(&mut self, peer: PeerId, request: &MailboxRequest) -> MailboxResponse {
        self.raw(peer, &request.encode()).await.response
    }

    async fn raw(&mut self, peer: PeerId, bytes: &[u8]) -> Handled {
        self.service.handle(peer, bytes, self.now, NOW).await
    }

    fn registration(&self, device: &Identity) -> MailboxRequest {
        self.registration_with(device, None, None)
    }

    fn registration_with(
        &self,
        device: &Identity,
        wakeup: Option<&str>,
        token: Option<&str>,
    ) -> MailboxRequest {
        MailboxRequest::Register(Box::new(Registration::new(
            device,
            &self.relay,
            NOW,
            wakeup.map(String::from),
            token.map(String::from),
        )))
    }

    async fn register(&mut self, device: &Identity) -> MailboxId {
        let request = self.registration(device);
        match self.send(device.peer_id(), &request).await {
            MailboxResponse::Registered { mailbox, ttl_secs } => {
                assert_eq!(ttl_secs, 14 * 86_400);
                assert_eq!(mailbox, MailboxId::of(&device.device_id(), &self.relay));
                mailbox
            }
            other => panic!("registration refused: {other:?}"),
        }
    }

    async fn deposit(&mut self, mailbox: MailboxId, envelopes: Vec<Vec<u8>>) -> MailboxResponse {
        let depositor = identity("depositor").peer_id();
        self.send(depositor, &MailboxRequest::Deposit { mailbox, envelopes })
            .await
    }

    async fn fetch(&mut self, peer: PeerId) -> MailboxResponse {
        self.send(
            peer,
            &MailboxRequest::Fetch {
                after: 0,
                limit: 1024,
            },
        )
        .await
    }
}

fn refusal(response: &MailboxResponse) -> (Refusal, &str) {
    match response {
        MailboxResponse::Refused { reason, message } => (*reason, message.as_str()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn mail(response: MailboxResponse) -> Vec<(u64, Vec<u8>)> {
    match response {
        MailboxResponse::Mail { items, .. } => items,
        other => panic!("expected mail, got {other:?}"),
    }
}

#[tokio::test]
async fn forged_or_misdirected_registrations_are_refused() {
    let mut f = fixture();
    let alice = identity("alice");
    let mallory = identity("mallory");
    // Sent by someone else than the device it registers.
    let request = f.registration(&alice);
    let r = f.send(mallory.peer_id(), &request).await;
    assert_eq!(refusal(&r).0, Refusal::Forbidden, "{r:?}");
    // A forged signature (changed after signing).
    let MailboxRequest::Register(mut forged) = f.registration(&alice) else {
        unreachable!()
    };
    forged.wakeup = Some("https://push.example.org/evil".into());
    let r = f
        .send(alice.peer_id(), &MailboxRequest::Register(forged))
        .await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::Forbidden);
    assert!(message.contains("signed"), "{message}");
    // An unsigned one.
    let MailboxRequest::Register(mut unsigned) = f.registration(&alice) else {
        unreachable!()
    };
    unsigned.signature = [0; 64];
    let r = f
        .send(alice.peer_id(), &MailboxRequest::Register(unsigned))
        .await;
    assert_eq!(refusal(&r).0, Refusal::Forbidden);
    // Another user's certificate under this device's signature.
    let MailboxRequest::Register(mut swapped) = f.registration(&alice) else {
        unreachable!()
    };
    swapped.certificate = mallory.certificate().clone();
    let r = f
        .send(alice.peer_id(), &MailboxRequest::Register(swapped))
        .await;
    assert_eq!(refusal(&r).0, Refusal::Forbidden);
    // For another relay.
    let other_relay = identity("other relay").peer_id();
    let elsewhere = Registration::new(&alice, &other_relay, NOW, None, None);
    let r = f
        .send(
            alice.peer_id(),
            &MailboxRequest::Register(Box::new(elsewhere)),
        )
        .await;
    assert_eq!(refusal(&r).0, Refusal::Forbidden);
    // Too old.
    let stale = Registration::new(&alice, &f.relay, NOW - 3_600_000, None, None);
    let r = f
        .send(alice.peer_id(), &MailboxRequest::Register(Box::new(stale)))
        .await;
    assert_eq!(refusal(&r).0, Refusal::Forbidden);
    // None of it opened a mailbox.
    let r = f.fetch(alice.peer_id()).await;
    assert_eq!(refusal(&r).0, Refusal::NotRegistered);
    // The real one works.
    f.register(&alice).await;
    assert!(mail(f.fetch(alice.peer_id()).await).is_empty());
}

#[tokio::test]
async fn a_peer_fetches_and_acks_only_its_own_mailbox() {
    let mut f = fixture();
    let alice = identity("alice");
    let bob = identity("bob");
    let carol = identity("carol");
    let alice_box = f.register(&alice).await;
    let bob_box = f.register(&bob).await;
    let r = f
        .deposit(
            alice_box,
            vec![b"for alice 1".to_vec(), b"for alice 2".to_vec()],
        )
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 2 });
    f.deposit(bob_box, vec![b"for bob".to_vec()]).await;
    // Bob sees only his own mail, whatever cursor he asks from.
    let bobs = mail(f.fetch(bob.peer_id()).await);
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].1, b"for bob");
    // Bob acknowledging everything deletes only his.
    let r = f
        .send(bob.peer_id(), &MailboxRequest::Ack { up_to: u64::MAX })
        .await;
    assert_eq!(r, MailboxResponse::Acked { deleted: 1 });
    // Carol, unregistered, gets nothing and deletes nothing.
    let r = f.fetch(carol.peer_id()).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::NotRegistered);
    assert!(message.contains("register"), "{message}");
    let r = f
        .send(carol.peer_id(), &MailboxRequest::Ack { up_to: u64::MAX })
        .await;
    assert_eq!(refusal(&r).0, Refusal::NotRegistered);
    // Alice's mail is all there.
    let alices = mail(f.fetch(alice.peer_id()).await);
    assert_eq!(
        alices.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![b"for alice 1".to_vec(), b"for alice 2".to_vec()]
    );
    // Acks are by cursor: up to the first leaves the second.
    let r = f
        .send(alice.peer_id(), &MailboxRequest::Ack { up_to: alices[0].0 })
        .await;
    assert_eq!(r, MailboxResponse::Acked { deleted: 1 });
    assert_eq!(mail(f.fetch(alice.peer_id()).await), alices[1..].to_vec());
}

#[tokio::test]
async fn bad_deposits_get_clear_refusals_and_nothing_is_dropped_silently() {
    let limits = StoreLimits {
        max_envelopes: 3,
        ..StoreLimits::default()
    };
    let mut f = fixture_with(ServiceConfig::default(), limits);
    let alice = identity("alice");
    let mailbox = f.register(&alice).await;
    // Over the envelope size limit.
    let r = f
        .deposit(mailbox, vec![vec![0u8; MAX_ENVELOPE_BYTES + 1]])
        .await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::BadRequest);
    assert!(message.contains("bytes"), "{message}");
    // Too many in one deposit, or none.
    let r = f
        .deposit(mailbox, vec![b"x".to_vec(); MAX_DEPOSIT + 1])
        .await;
    assert_eq!(refusal(&r).0, Refusal::BadRequest);
    let r = f.deposit(mailbox, vec![]).await;
    assert_eq!(refusal(&r).0, Refusal::BadRequest);
    // An unknown mailbox.
    let r = f.deposit(MailboxId([7; 16]), vec![b"lost?".to_vec()]).await;
    assert_eq!(refusal(&r).0, Refusal::NotRegistered);
    // Duplicates: accepted, stored once.
    let r = f.deposit(mailbox, vec![b"a".to_vec(), b"a".to_vec()]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 2 });
    let r = f.deposit(mailbox, vec![b"a".to_vec()]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    f.deposit(mailbox, vec![b"b".to_vec(), b"c".to_vec()]).await;
    // Full: the sender is told, whole deposit refused.
    let r = f.deposit(mailbox, vec![b"d".to_vec(), b"a".to_vec()]).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::MailboxFull);
    assert!(message.contains("full"), "{message}");
    assert!(message.contains("nothing was stored"), "{message}");
    let stored = mail(f.fetch(alice.peer_id()).await);
    assert_eq!(
        stored.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    // Garbage and requests a relay does not take.
    let h = f.raw(alice.peer_id(), b"\xff\xff\xff garbage").await;
    assert_eq!(refusal(&h.response).0, Refusal::BadRequest);
    let r = f.send(alice.peer_id(), &MailboxRequest::Wakeup).await;
    assert_eq!(refusal(&r).0, Refusal::BadRequest);
}

#[tokio::test]
async fn a_flood_is_rate_limited_and_the_relay_stays_healthy() {
    let config = ServiceConfig {
        requests_per_sec: 10.0,
        request_burst: 20,
        ..ServiceConfig::default()
    };
    let mut f = fixture_with(config, StoreLimits::default());
    let alice = identity("alice");
    let mailbox = f.register(&alice).await;
    let flooder = identity("flooder").peer_id();
    let mut limited = 0;
    let mut stored = 0;
    let mut pending = Vec::new();
    for n in 0..500u32 {
        let request = MailboxRequest::Deposit {
            mailbox,
            envelopes: vec![n.to_be_bytes().to_vec()],
        };
        pending.push(f.service.handle(flooder, &request.encode(), f.now, NOW));
    }
    for p in pending {
        match p.await.response {
            MailboxResponse::Deposited { .. } => stored += 1,
            MailboxResponse::Refused {
                reason: Refusal::RateLimited,
                message,
            } => {
                assert!(message.contains("too many requests"), "{message}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored, 20, "the burst is served");
    assert_eq!(limited, 480);
    assert_eq!(f.service.metrics().refusals(Refusal::RateLimited), 480);
    // Others are unaffected.
    let r = f.deposit(mailbox, vec![b"legit".to_vec()]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    assert_eq!(mail(f.fetch(alice.peer_id()).await).len(), 21);
    // The flooder is served again once its bucket refills.
    f.now += Duration::from_millis(200);
    let r = f
        .send(
            flooder,
            &MailboxRequest::Deposit {
                mailbox,
                envelopes: vec![b"later".to_vec()],
            },
        )
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    // The store is still answering.
    assert_eq!(f.store.totals().await.unwrap().envelopes, 22);
}

#[tokio::test]
async fn the_allow_list_admits_listed_users_only() {
    let alice = identity("alice");
    let bob = identity("bob");
    let config = ServiceConfig {
        access: Access::AllowList(HashSet::from([alice.user_id()])),
        ..ServiceConfig::default()
    };
    let mut f = fixture_with(config, StoreLimits::default());
    f.register(&alice).await;
    let request = f.registration(&bob);
    let r = f.send(bob.peer_id(), &request).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::Forbidden);
    assert!(message.contains("allow-list"), "{message}");
    // Anyone may still deposit for a registered mailbox.
    let alice_box = MailboxId::of(&alice.device_id(), &f.relay);
    let r = f
        .send(
            bob.peer_id(),
            &MailboxRequest::Deposit {
                mailbox: alice_box,
                envelopes: vec![b"hi".to_vec()],
            },
        )
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
}

#[tokio::test]
async fn invite_tokens_admit_new_mailboxes_and_renewals_need_none() {
    let config = ServiceConfig {
        access: Access::Invite(HashSet::from(["open sesame".to_string()])),
        ..ServiceConfig::default()
    };
    let mut f = fixture_with(config, StoreLimits::default());
    let alice = identity("alice");
    let request = f.registration(&alice);
    let r = f.send(alice.peer_id(), &request).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::Forbidden);
    assert!(message.contains("invite token"), "{message}");
    let wrong = f.registration_with(&alice, None, Some("guess"));
    let r = f.send(alice.peer_id(), &wrong).await;
    assert_eq!(refusal(&r).0, Refusal::Forbidden);
    let right = f.registration_with(&alice, None, Some("open sesame"));
    assert!(matches!(
        f.send(alice.peer_id(), &right).await,
        MailboxResponse::Registered { .. }
    ));
    // Renewal without the token.
    f.register(&alice).await;
}

#[tokio::test]
async fn wakeup_urls_into_the_operators_network_are_refused() {
    let mut f = fixture();
    let alice = identity("alice");
    for url in [
        "http://127.0.0.1:9740/metrics",
        "http://169.254.169.254/latest",
        "http://localhost/x",
    ] {
        let request = f.registration_with(&alice, Some(url), None);
        let r = f.send(alice.peer_id(), &request).await;
        assert_eq!(refusal(&r).0, Refusal::BadRequest, "{url}");
    }
    let request = f.registration_with(&alice, Some("https://push.example.org/up/x"), None);
    assert!(matches!(
        f.send(alice.peer_id(), &request).await,
        MailboxResponse::Registered { .. }
    ));
    let info = f
        .store
        .mailbox(MailboxId::of(&alice.device_id(), &f.relay))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        info.wakeup.as_deref(),
        Some("https://push.example.org/up/x")
    );
    assert_eq!(info.peer, alice.peer_id());
}

#[tokio::test]
async fn a_draining_relay_refuses_new_requests_as_unavailable() {
    let mut f = fixture();
    let alice = identity("alice");
    f.register(&alice).await;
    f.service.drain();
    let r = f.fetch(alice.peer_id()).await;
    assert_eq!(refusal(&r).0, Refusal::Unavailable);
}
