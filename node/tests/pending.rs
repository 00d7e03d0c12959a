//! The pending queue (envelopes a node cannot place yet: a key, a device or
//! a group on its way) under a hostile peer: a flood from one peer evicts
//! none of another's honest envelopes, which apply when their group comes,
//! and gets the flooder dropped; junk a peer sent directly costs it when it
//! turns out to be junk; more than a page of pending envelopes is taken in
//! full, and taking them in ends even when they stay pending.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DEADLINE, TestNode, befriend, group_create, next_event_matching};
use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use tokio::sync::mpsc;
use weft_node::Settings;
use weft_node::api::Request;
use weft_node::crypto::chain::SendingChain;
use weft_node::crypto::envelope::{Envelope, Sealing, seal_chain, seal_to_devices};
use weft_node::hlc::Hlc;
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::ids::{ConversationId, RoutingTag};
use weft_node::net::{self, NetCommand, NetConfig, NetEvent, NetHandle};
use weft_node::node::{DirectRequest, DirectResponse};
use weft_node::payload::{Payload, SenderKey, TextMessage};
use weft_node::store::{PendingCaps, PendingLimit};

/// A bare libp2p peer (not a Weft node) connected to one node, handing it
/// envelopes over the direct protocol as anyone can.
struct Peer {
    net: NetHandle,
    events: mpsc::Receiver<NetEvent>,
    to: PeerId,
}

impl Peer {
    async fn connect(seed: &[u8], node: &TestNode) -> Self {
        let mut config = NetConfig::memory(common::next_port());
        config.bootstrap = vec![node.dial_addr()];
        let key = Identity::from_seed(seed, 0)
            .unwrap()
            .libp2p_keypair()
            .unwrap();
        let (net, mut events, _) = net::spawn(key, config).unwrap();
        let to = node.handle.peer_id();
        next_event_matching(
            &mut events,
            "the peer to connect",
            |ev| matches!(ev, NetEvent::Connected { peer, .. } if *peer == to),
        )
        .await;
        Self { net, events, to }
    }

    /// Hands `envelopes` over in one direct request; how many the node
    /// accepted (`None`: no answer, as when it dropped us).
    async fn send(&self, envelopes: Vec<Vec<u8>>) -> Option<u32> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.net
            .send(NetCommand::Direct {
                peer: self.to,
                data: postcard::to_stdvec(&DirectRequest::Envelopes(envelopes)).unwrap(),
                reply,
            })
            .await
            .unwrap();
        let answer = tokio::time::timeout(DEADLINE, rx)
            .await
            .unwrap()
            .ok()?
            .ok()?;
        match postcard::from_bytes(&answer).unwrap() {
            DirectResponse::Ack { accepted } => Some(accepted),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Waits until the node drops the connection (it banned us).
    async fn dropped(&mut self, what: &str) {
        let to = self.to;
        next_event_matching(
            &mut self.events,
            what,
            |ev| matches!(ev, NetEvent::Disconnected { peer } if *peer == to),
        )
        .await;
    }
}

/// `count` well-signed chain envelopes under routing tags nobody knows,
/// from `senders` fresh device keys in turn, `len` bytes of ciphertext
/// each: what anyone can make, and what a node keeps pending (a group it
/// has not heard of may be on its way).
fn unplaceable(seed: u8, count: usize, senders: usize, len: usize) -> Vec<Vec<u8>> {
    let keys: Vec<SigningKey> = (0..senders)
        .map(|s| {
            let mut secret = [seed; 32];
            secret[..8].copy_from_slice(&(s as u64).to_be_bytes());
            SigningKey::from_bytes(&secret)
        })
        .collect();
    let mut chain = SendingChain::new([seed; 32]);
    (0..count)
        .map(|i| {
            let (counter, key) = chain.step().unwrap();
            let mut tag = [seed; 16];
            tag[..8].copy_from_slice(&(i as u64).to_be_bytes());
            seal_chain(
                &keys[i % senders],
                RoutingTag(tag),
                1,
                counter,
                &key,
                &vec![0; len],
            )
            .unwrap()
            .into_bytes()
        })
        .collect()
}

fn is_chain(envelope: &[u8]) -> bool {
    matches!(
        Envelope::decode(envelope).unwrap().header.sealing,
        Sealing::Chain { .. }
    )
}

/// A new sending chain of `from`'s device in `conversation` (at `epoch`),
/// sealed by hand to `to`'s device, as any member may hand one over, and
/// the chain.
fn sender_key(
    from: &Identity,
    conversation: ConversationId,
    tag: RoutingTag,
    to: &Identity,
    epoch: u64,
) -> (Vec<u8>, SendingChain) {
    let mut chain_key = [0u8; 32];
    chain_key[..8].copy_from_slice(&epoch.to_be_bytes());
    chain_key[8..].copy_from_slice(&from.device_id().0[..24]);
    let chain = SendingChain::new(chain_key);
    let (chain_key, next_counter) = chain.distribution();
    let payload = Payload::SenderKey(SenderKey {
        epoch,
        chain_key,
        next_counter,
        sender_cert: from.certificate().clone(),
        sender_name: "Someone".into(),
    });
    let envelope = seal_to_devices(
        from.device_signing_key(),
        tag,
        conversation,
        &[(to.device_id(), to.certificate().dh)],
        [0x11; 32],
        [0x22; 32],
        &payload.encode(),
    )
    .unwrap();
    (envelope.into_bytes(), chain)
}

/// The keys a test node named `name` runs with.
fn identity(name: &str, seed: u64) -> Identity {
    Identity::from_seed(format!("{name}/{seed}").as_bytes(), 0).unwrap()
}

/// The envelopes `act` made `node` hold.
async fn made_by<F: std::future::Future>(node: &TestNode, act: F) -> Vec<Vec<u8>> {
    let before = node.all_envelopes();
    act.await;
    let mut after = node.all_envelopes();
    after.retain(|e| !before.contains(e));
    after
}

/// What `node`'s pending queue holds per delivering peer, as (peer, rows,
/// bytes), read through a second connection to its store.
fn pending_by_peer(node: &TestNode) -> Vec<(Vec<u8>, i64, i64)> {
    let db = rusqlite::Connection::open(Home::new(node.dir.path().join("home")).db_path()).unwrap();
    db.prepare("SELECT peer, count(*), sum(length(bytes)) FROM pending GROUP BY peer")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Alice and bob (with `settings`), contacts; then alice offline: the
/// test carries what she makes.
async fn apart(seed: u64, settings: Settings) -> (TestNode, TestNode) {
    let mut alice = TestNode::start("alice", seed, &[]).await;
    let bob = TestNode::start_with("bob", seed, &[&alice], settings).await;
    befriend(&alice, &bob).await;
    alice.stop().await;
    let alice = TestNode::start_offline("alice", alice.dir).await;
    (alice, bob)
}

/// How many envelopes `node` keeps pending that `peer` handed over.
fn held_by(node: &TestNode, peer: &Peer) -> i64 {
    let id = peer.net.peer_id().to_bytes();
    pending_by_peer(node)
        .iter()
        .find(|h| h.0 == id)
        .map_or(0, |h| h.1)
}

fn rows(rows: u64) -> PendingLimit {
    PendingLimit {
        rows,
        bytes: u64::MAX,
    }
}

/// Bob keeps alice's message for a group he has not heard of, handed over
/// by one peer, while another floods him with more envelopes he cannot
/// place than his whole queue holds. The flood pushes out only its own
/// (before the caps per peer and per sender, 16 in all, oldest first,
/// pushed alice's out and it never showed), and bob drops the flooder; when
/// the group comes, alice's message shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_flood_from_one_peer_evicts_nothing_of_anothers() {
    const SEED: u64 = 40;
    let small = Settings {
        pending_caps: PendingCaps {
            total: rows(16),
            per_peer: rows(8),
            per_sender: rows(4),
        },
        ..Settings::default()
    };
    let (alice, bob) = apart(SEED, small).await;
    let from_alice = made_by(&alice, async {
        alice.call(group_create("pair", &["bob"])).await;
        alice.send("pair", "hello").await;
    })
    .await;
    let (chain, sealed): (Vec<_>, Vec<_>) = from_alice.into_iter().partition(|e| is_chain(e));
    assert!(!chain.is_empty() && !sealed.is_empty());

    let courier = Peer::connect(b"courier", &bob).await;
    let mut mallory = Peer::connect(b"mallory", &bob).await;
    // The message comes before its group: bob keeps it.
    assert!(courier.send(chain.clone()).await.is_some());
    let kept = held_by(&bob, &courier);
    assert!(kept > 0);
    // 60 from six senders, in one request: more than the queue holds.
    mallory.send(unplaceable(1, 60, 6, 100)).await;
    // Over her share on every envelope past the eighth: enough strikes.
    mallory.dropped("bob to drop mallory").await;
    assert_eq!(held_by(&bob, &mallory), 8, "mallory keeps her share");
    assert_eq!(held_by(&bob, &courier), kept);

    // The group comes: alice's message, kept all along, shows.
    assert!(courier.send(sealed).await.is_some());
    bob.expect_text("pair", "hello").await;
}

/// Carol, a hostile member of the trio, sends bob directly (from a peer of
/// her own) envelopes under a chain of hers he has no key for yet, then
/// the key: they do not decrypt under it. Junk found when they are taken
/// from the pending queue are strikes against the peer that sent them, and
/// bob drops it (before, nothing happened to it: it could fill the queue
/// with junk for free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_a_peer_sent_directly_costs_it_when_it_leaves_the_pending_queue() {
    const SEED: u64 = 41;
    let (alice, bob, _carol) = common::trio(SEED).await;
    alice.send("trio", "hi").await;
    bob.expect_text("trio", "hi").await;
    let hi = bob.messages("trio").await.remove(0);
    let conversation: ConversationId = hi["conversation"].as_str().unwrap().parse().unwrap();
    let tag = common::tag_of(&bob.envelope_bytes(hi["id"].as_str().unwrap()));
    let carol = identity("carol", SEED);
    let (key, _chain) = sender_key(&carol, conversation, tag, &identity("bob", SEED), 777);
    // Signed by carol's device, under the group's tag and her new chain's
    // counters, but sealed with keys of another chain.
    let mut other = SendingChain::new([0x66; 32]);
    let junk: Vec<Vec<u8>> = (0..24)
        .map(|_| {
            let (counter, wrong) = other.step().unwrap();
            seal_chain(
                carol.device_signing_key(),
                tag,
                777,
                counter,
                &wrong,
                b"junk",
            )
            .unwrap()
            .into_bytes()
        })
        .collect();
    let mut carols_peer = Peer::connect(b"carol's own peer", &bob).await;
    // Kept: bob has no key for that chain yet.
    assert_eq!(carols_peer.send(junk).await, Some(24));
    assert_eq!(held_by(&bob, &carols_peer), 24);
    carols_peer.send(vec![key]).await;
    carols_peer
        .dropped("bob to drop the peer that sent him junk")
        .await;
    assert_eq!(held_by(&bob, &carols_peer), 0, "the junk was taken once");
    // Nothing of it shows, and the group goes on.
    alice.send("trio", "still here").await;
    bob.expect_text("trio", "still here").await;
    assert_eq!(bob.texts("trio").await, ["hi", "still here"]);
}

/// More than a page of envelopes from a new chain of carol's waits for
/// its key at bob. A new chain of alice's comes first: each of carol's is
/// taken, still cannot be placed, and is kept again (after the rows there
/// were, where taking them in stops; without that bound it never ended and
/// bob never answered). Then carol's key comes, and all of them show,
/// across pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_page_of_pending_envelopes_is_taken_in_full() {
    const SEED: u64 = 42;
    const COUNT: usize = 300;
    let (alice, bob, _carol) = common::trio(SEED).await;
    alice.send("trio", "hi").await;
    bob.expect_text("trio", "hi").await;
    let hi = bob.messages("trio").await.remove(0);
    let conversation: ConversationId = hi["conversation"].as_str().unwrap().parse().unwrap();
    let tag = common::tag_of(&bob.envelope_bytes(hi["id"].as_str().unwrap()));
    let (carol, bob_id) = (identity("carol", SEED), identity("bob", SEED));
    let (carols_key, mut carols_chain) = sender_key(&carol, conversation, tag, &bob_id, 777);
    let sent_at = Hlc(hi["hlc"].as_u64().unwrap()).ms();
    let chain: Vec<Vec<u8>> = (0..COUNT)
        .map(|i| {
            let (counter, key) = carols_chain.step().unwrap();
            let text = Payload::Text(TextMessage {
                text: format!("carol {i}"),
                reply_to: None,
                hlc: Hlc::new(sent_at + i as u64, 0),
                epoch: 1,
            });
            seal_chain(
                carol.device_signing_key(),
                tag,
                777,
                counter,
                &key,
                &text.encode(),
            )
            .unwrap()
            .into_bytes()
        })
        .collect();
    let deliver = |envelopes: Vec<Vec<u8>>| {
        let handle = bob.handle.clone();
        async move {
            tokio::time::timeout(DEADLINE, handle.deliver(envelopes))
                .await
                .expect("bob answers")
                .unwrap()
        }
    };
    deliver(chain).await;
    let waiting = || pending_by_peer(&bob).iter().map(|h| h.1).sum::<i64>();
    assert_eq!(waiting(), COUNT as i64);
    // Alice's new chain: carol's envelopes are taken again, and kept.
    let (alices_key, _) = sender_key(&identity("alice", SEED), conversation, tag, &bob_id, 9);
    assert_eq!(deliver(vec![alices_key]).await, 1);
    assert_eq!(waiting(), COUNT as i64);
    // Carol's key: all of them.
    assert_eq!(deliver(vec![carols_key]).await, 1);
    let texts = bob
        .wait_messages("trio", "all of carol's", |ms| ms.len() == COUNT + 1)
        .await;
    for i in 0..COUNT {
        let text = format!("carol {i}");
        assert!(texts.iter().any(|m| m["text"] == text.as_str()), "{text}");
    }
    assert_eq!(waiting(), 0);
}

/// Hundreds of new chains of alice's for a group bob has not heard of wait
/// for it; when it comes, each one taken in asks for the group's pending
/// envelopes to be taken in again. Those passes run one after another,
/// not one inside the other (before, each key nested a pass inside the
/// last, a stack frame and a page each, and bob's engine overflowed its
/// stack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_open_each_other_in_the_pending_queue_do_not_nest() {
    const SEED: u64 = 43;
    const KEYS: u64 = 600;
    let (alice, bob) = apart(SEED, Settings::default()).await;
    let from_alice = made_by(&alice, async {
        alice.call(group_create("keys", &["bob"])).await;
        alice.send("keys", "hello").await;
    })
    .await;
    let (chain, sealed): (Vec<_>, Vec<_>) = from_alice.into_iter().partition(|e| is_chain(e));
    let group = alice.call(Request::Conversations).await;
    let group = group
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "keys")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .parse::<ConversationId>()
        .unwrap();
    let (alice_id, bob_id) = (identity("alice", SEED), identity("bob", SEED));
    let keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|n| sender_key(&alice_id, group, RoutingTag([7; 16]), &bob_id, 100 + n).0)
        .collect();
    let deliver = |envelopes: Vec<Vec<u8>>| {
        let handle = bob.handle.clone();
        async move {
            tokio::time::timeout(DEADLINE, handle.deliver(envelopes))
                .await
                .expect("bob answers")
                .expect("bob's node runs")
        }
    };
    // All kept: the group is not known yet.
    assert_eq!(deliver(keys).await, KEYS as u32);
    deliver(chain).await;
    deliver(sealed).await;
    bob.expect_text("keys", "hello").await;
    assert_eq!(
        pending_by_peer(&bob).iter().map(|h| h.1).sum::<i64>(),
        0,
        "every key was taken in"
    );
}
