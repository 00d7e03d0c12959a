//! The mailbox service against abuse: forged registrations, reading
//! someone else's mailbox, oversized, unverifiable and over-quota
//! deposits (by depositor too), floods, and the access modes. In-process,
//! with a real store thread on an in-memory database; identities are
//! seeded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/envelopes.rs"]
mod envelopes;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use envelopes::{device, forged, sealed};
use libp2p::PeerId;
use weft_node::crypto::envelope::MAX_ENVELOPE_BYTES;
use weft_node::identity::Identity;
use weft_node::mailbox::{
    MAX_DEPOSIT, MailboxId, MailboxRequest, MailboxResponse, Refusal, Registration,
};
use weft_relay::config::Access;
use weft_relay::depositor::{CoolOff, Source};
use weft_relay::metrics::RelayMetrics;
use weft_relay::service::{Handled, Service, ServiceConfig};
use weft_relay::store::{DepositorQuotas, Quota, QuotaKind, Store, StoreHandle, StoreLimits};

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
        service: Service::new(relay, config, store.clone(), RelayMetrics::default()).unwrap(),
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
        self.service
            .handle(peer, source_of(&peer), bytes, self.now, NOW)
            .await
    }

    async fn deposit_from(
        &mut self,
        peer: PeerId,
        source: Source,
        mailbox: MailboxId,
        envelopes: Vec<Vec<u8>>,
    ) -> MailboxResponse {
        let request = MailboxRequest::Deposit { mailbox, envelopes }.encode();
        self.service
            .handle(peer, source, &request, self.now, NOW)
            .await
            .response
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

/// Each peer its own address, unless a test says otherwise.
fn source_of(peer: &PeerId) -> Source {
    let b = peer.to_bytes();
    let n = b.len();
    Source::V4([10, b[n - 3], b[n - 2], b[n - 1]])
}

/// Envelope `n` from the usual sender, of about 100 bytes.
fn env(n: u64) -> Vec<u8> {
    sealed(&device("sender"), n, 100)
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
    let r = f.deposit(alice_box, vec![env(1), env(2)]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 2 });
    f.deposit(bob_box, vec![env(3)]).await;
    // Bob sees only his own mail, whatever cursor he asks from.
    let bobs = mail(f.fetch(bob.peer_id()).await);
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].1, env(3));
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
        vec![env(1), env(2)]
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
    let r = f.deposit(mailbox, vec![env(0); MAX_DEPOSIT + 1]).await;
    assert_eq!(refusal(&r).0, Refusal::BadRequest);
    let r = f.deposit(mailbox, vec![]).await;
    assert_eq!(refusal(&r).0, Refusal::BadRequest);
    // An unknown mailbox.
    let r = f.deposit(MailboxId([7; 16]), vec![env(0)]).await;
    assert_eq!(refusal(&r).0, Refusal::NotRegistered);
    // Duplicates: accepted, stored once.
    let (a, b, c, d) = (env(1), env(2), env(3), env(4));
    let r = f.deposit(mailbox, vec![a.clone(), a.clone()]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 2 });
    let r = f.deposit(mailbox, vec![a.clone()]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    f.deposit(mailbox, vec![b.clone(), c.clone()]).await;
    // Full: the sender is told, whole deposit refused.
    let r = f.deposit(mailbox, vec![d, a.clone()]).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::MailboxFull);
    assert!(message.contains("full"), "{message}");
    assert!(message.contains("nothing was stored"), "{message}");
    let stored = mail(f.fetch(alice.peer_id()).await);
    assert_eq!(
        stored.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![a, b, c]
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
            envelopes: vec![env(u64::from(n))],
        };
        let source = source_of(&flooder);
        pending.push(
            f.service
                .handle(flooder, source, &request.encode(), f.now, NOW),
        );
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
    let r = f.deposit(mailbox, vec![env(1000)]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    assert_eq!(mail(f.fetch(alice.peer_id()).await).len(), 21);
    // The flooder is served again once its bucket refills.
    f.now += Duration::from_millis(200);
    let r = f
        .send(
            flooder,
            &MailboxRequest::Deposit {
                mailbox,
                envelopes: vec![env(1001)],
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
                envelopes: vec![env(1)],
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

#[tokio::test]
async fn unverifiable_deposits_are_refused_whole_and_nothing_is_stored() {
    let mut f = fixture();
    let alice = identity("alice");
    let mailbox = f.register(&alice).await;
    let mallory = device("mallory");
    // A good envelope, then one whose signature was changed.
    let r = f
        .deposit(mailbox, vec![env(1), forged(&mallory, 2, 100), env(3)])
        .await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::BadRequest);
    assert!(message.contains("envelope 1 "), "{message}");
    assert!(message.contains("signature does not verify"), "{message}");
    assert!(message.contains("nothing was stored"), "{message}");
    // For a second the depositor's deposits are refused unchecked.
    let r = f.deposit(mailbox, vec![env(1)]).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::RateLimited);
    assert!(message.contains("did not verify"), "{message}");
    assert_eq!(f.service.metrics().cooled_off(), 1);
    f.now += CoolOff::PERIOD;
    // Bytes that are no envelope at all.
    let r = f
        .deposit(mailbox, vec![env(1), b"\x02 junk".to_vec()])
        .await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::BadRequest);
    assert!(message.contains("envelope 1 "), "{message}");
    assert!(message.contains("malformed"), "{message}");
    f.now += CoolOff::PERIOD;
    // Mallory's envelope claiming to come from alice's device: the header
    // (version, tag, sender) names alice, the signature is mallory's.
    let mut claimed = sealed(&mallory, 4, 100);
    claimed[17..49].copy_from_slice(&alice.device_id().0);
    let r = f.deposit(mailbox, vec![claimed]).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::BadRequest);
    assert!(message.contains("envelope 0 "), "{message}");
    f.now += CoolOff::PERIOD;
    // None of it was stored, not even the good envelopes beside the bad.
    assert!(mail(f.fetch(alice.peer_id()).await).is_empty());
    assert_eq!(f.store.totals().await.unwrap().envelopes, 0);
    assert_eq!(f.service.metrics().unverified_deposits(), 3);
    // Mallory's own envelopes, signed by her, are fine.
    let r = f
        .deposit(mailbox, vec![sealed(&mallory, 5, 100), env(1)])
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 2 });
}

fn limits_with(depositors: DepositorQuotas) -> StoreLimits {
    StoreLimits {
        depositors,
        ..StoreLimits::default()
    }
}

fn count(envelopes: u64) -> Quota {
    Quota {
        envelopes,
        bytes: 0,
    }
}

#[tokio::test]
async fn a_stranger_over_its_share_of_a_mailbox_is_refused_and_honest_mail_still_goes_in() {
    let quotas = DepositorQuotas {
        peer_per_mailbox: count(5),
        ..DepositorQuotas::UNLIMITED
    };
    let mut f = fixture_with(ServiceConfig::default(), limits_with(quotas));
    let victim = identity("victim");
    let mailbox = f.register(&victim).await;
    let stranger = identity("stranger");
    let spam = device("spam");
    for n in 0..5 {
        let r = f
            .deposit_from(
                stranger.peer_id(),
                source_of(&stranger.peer_id()),
                mailbox,
                vec![sealed(&spam, n, 200)],
            )
            .await;
        assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    }
    let r = f
        .deposit_from(
            stranger.peer_id(),
            source_of(&stranger.peer_id()),
            mailbox,
            vec![sealed(&spam, 5, 200)],
        )
        .await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::MailboxFull);
    assert!(
        message.contains(&format!("peer {}", stranger.peer_id())),
        "{message}"
    );
    assert!(
        message.contains("storage.max_envelopes_per_peer_per_mailbox"),
        "{message}"
    );
    assert!(message.contains("nothing was stored"), "{message}");
    assert_eq!(
        f.service
            .metrics()
            .quota_refusals(QuotaKind::PeerPerMailbox),
        1
    );
    // The victim's friend still gets through.
    let friend = identity("friend");
    let r = f
        .deposit_from(
            friend.peer_id(),
            source_of(&friend.peer_id()),
            mailbox,
            vec![env(1), env(2)],
        )
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 2 });
    let got = mail(f.fetch(victim.peer_id()).await);
    assert_eq!(got.len(), 7);
    assert_eq!(got[5].1, env(1));
    // For a second the stranger is refused unchecked: even an envelope
    // that does not verify gets the quota's refusal, not a verification.
    let r = f
        .deposit_from(
            stranger.peer_id(),
            source_of(&stranger.peer_id()),
            mailbox,
            vec![forged(&spam, 6, 200)],
        )
        .await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::MailboxFull);
    assert!(message.contains("without being checked"), "{message}");
    assert_eq!(f.service.metrics().unverified_deposits(), 0);
    // Once the victim has fetched its mail and the second is over, the
    // stranger may deposit again.
    let last = got.last().unwrap().0;
    let r = f
        .send(victim.peer_id(), &MailboxRequest::Ack { up_to: last })
        .await;
    assert_eq!(r, MailboxResponse::Acked { deleted: 7 });
    f.now += CoolOff::PERIOD;
    let r = f
        .deposit_from(
            stranger.peer_id(),
            source_of(&stranger.peer_id()),
            mailbox,
            vec![sealed(&spam, 7, 200)],
        )
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
}

#[tokio::test]
async fn a_depositor_is_limited_in_all_mailboxes_and_by_its_address() {
    let quotas = DepositorQuotas {
        peer: count(4),
        ip_per_mailbox: count(6),
        ip: count(9),
        ..DepositorQuotas::UNLIMITED
    };
    let mut f = fixture_with(ServiceConfig::default(), limits_with(quotas));
    let mut boxes = Vec::new();
    for name in ["v1", "v2", "v3"] {
        boxes.push(f.register(&identity(name)).await);
    }
    let spam = device("spam");
    let stranger_ip = Source::V4([203, 0, 113, 66]);
    let mut n = 0;
    let mut deposit = async |f: &mut Fixture, who: &Identity, mailbox: MailboxId| {
        n += 1;
        f.deposit_from(
            who.peer_id(),
            stranger_ip,
            mailbox,
            vec![sealed(&spam, n, 100)],
        )
        .await
    };
    // One peer: 4 in all, over two mailboxes.
    let first = identity("stranger 0");
    for mailbox in [boxes[0], boxes[0], boxes[1], boxes[1]] {
        let r = deposit(&mut f, &first, mailbox).await;
        assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    }
    let r = deposit(&mut f, &first, boxes[2]).await;
    let (reason, message) = refusal(&r);
    assert_eq!(reason, Refusal::MailboxFull);
    assert!(message.contains("waiting at this relay"), "{message}");
    assert!(
        message.contains("storage.max_envelopes_per_peer)"),
        "{message}"
    );
    // Fresh peer ids from the same address: 6 in one mailbox at most
    // (2 are there already), 9 in all.
    let mut refused = Vec::new();
    for i in 1..=6 {
        let sybil = identity(&format!("stranger {i}"));
        let r = deposit(&mut f, &sybil, boxes[0]).await;
        if let MailboxResponse::Refused { message, .. } = r {
            refused.push(message);
        }
    }
    // The second is refused unchecked: the address was over its share of
    // this mailbox a moment before.
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[1].contains("without being checked"),
        "{}",
        refused[1]
    );
    assert!(
        refused[0].contains("address 203.0.113.66"),
        "{}",
        refused[0]
    );
    assert!(refused[0].contains("in mailbox"), "{}", refused[0]);
    assert!(
        refused[0].contains("storage.max_envelopes_per_ip_per_mailbox"),
        "{}",
        refused[0]
    );
    let sybil = identity("stranger 7");
    let r = deposit(&mut f, &sybil, boxes[2]).await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    let r = deposit(&mut f, &sybil, boxes[2]).await;
    let (_, message) = refusal(&r);
    assert!(
        message.contains("storage.max_envelopes_per_ip)"),
        "{message}"
    );
    assert_eq!(f.service.metrics().quota_refusals(QuotaKind::Ip), 1);
    assert_eq!(
        f.service.metrics().quota_refusals(QuotaKind::IpPerMailbox),
        1
    );
    assert_eq!(f.service.metrics().cooled_off(), 1);
    assert_eq!(f.service.metrics().quota_refusals(QuotaKind::Peer), 1);
    // Someone from another address is not affected.
    let friend = identity("friend");
    let r = f
        .deposit_from(
            friend.peer_id(),
            Source::V4([198, 51, 100, 7]),
            boxes[0],
            vec![env(1)],
        )
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
}
