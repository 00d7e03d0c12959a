//! Metadata: who talks to whom must stay with the conversation's members.
//! Mallory runs a bare libp2p node (not Weft's code) with the keys of an
//! account alice and bob both added as a contact: she holds both their
//! invites, is connected to both, and subscribes to every topic she hears
//! announced. She is no member of alice and bob's conversation: she must
//! receive none of its envelopes and be unable to compute its topic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::{DEADLINE, TestNode, befriend};
use weft_node::api::Request;
use weft_node::crypto::envelope::Envelope;
use weft_node::identity::Identity;
use weft_node::ids::{ConversationId, RoutingTag};
use weft_node::net::{self, NetCommand, NetConfig, NetEvent};
use weft_node::routing::Routing;

/// What a node of protocol 1 named the topic of a conversation: computable
/// by anyone holding both users' invites.
fn topic_v1(conversation: &ConversationId) -> String {
    let h = blake3::derive_key("weft v1 gossip topic", &conversation.0);
    format!("weft/1/{}", hex::encode(&h[..20]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_contact_subscribing_to_every_topic_gets_nothing_of_others_conversations() {
    const SEED: u64 = 60;
    let alice = TestNode::start("alice", SEED, &[]).await;
    let bob = TestNode::start("bob", SEED, &[&alice]).await;
    befriend(&alice, &bob).await;
    let (alice_id, bob_id) = (alice.identity(), bob.identity());
    let mallory_id = Identity::from_seed(b"mallory/60", 0).unwrap();
    let mallory_invite = mallory_id
        .invite("Mallory", vec![mallory_id.certificate().clone()], vec![], 1)
        .unwrap();
    for node in [&alice, &bob] {
        node.call(Request::ContactAdd {
            invite: mallory_invite.clone(),
            name: Some("mallory".into()),
        })
        .await;
    }
    let ab = common::direct_routing(&alice_id, &bob_id);
    let (am, bm) = (
        common::direct_routing(&mallory_id, &alice_id),
        common::direct_routing(&mallory_id, &bob_id),
    );

    // What she can compute from both invites is not their topic.
    let direct = ConversationId::direct(&alice_id.user_id(), &bob_id.user_id());
    let guess = Routing::direct(
        mallory_id.account_dh_secret(),
        &alice_id.user_id(),
        &bob_id.certificate().account_dh,
        &bob_id.user_id(),
    )
    .unwrap();
    assert_ne!(topic_v1(&direct), ab.topic());
    assert_ne!(guess.topic(), ab.topic());
    assert_ne!(guess.tag(), ab.tag());

    // Her bare node joins every topic it hears of.
    let mut config = NetConfig::memory(common::next_port());
    config.bootstrap = vec![alice.dial_addr(), bob.dial_addr()];
    let (mallory, mut events, _task) =
        net::spawn(mallory_id.libp2p_keypair().unwrap(), config).unwrap();
    let mut joined = HashSet::new();
    let (alice_peer, bob_peer) = (alice.handle.peer_id(), bob.handle.peer_id());
    let mut heard_ab_from = HashSet::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut next = async || {
        tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("mallory's node went quiet before the test ended")
            .expect("mallory's node stopped")
    };
    // Until she has heard both alice and bob announce their topic (so the
    // gate, not ignorance, is what keeps her out).
    while heard_ab_from.len() < 2 {
        if let NetEvent::Subscribed { peer, topic } = next().await {
            if joined.insert(topic.clone()) {
                mallory
                    .send(NetCommand::Subscribe(topic.clone()))
                    .await
                    .unwrap();
            }
            if topic == ab.topic() && (peer == alice_peer || peer == bob_peer) {
                heard_ab_from.insert(peer);
            }
        }
    }

    // Alice and bob talk; then each writes to mallory, whose own
    // conversations' envelopes she does receive: they come after theirs.
    for i in 0..5 {
        alice.send("bob", &format!("to bob {i}")).await;
        bob.send("alice", &format!("to alice {i}")).await;
    }
    bob.expect_text("alice", "to bob 4").await;
    alice.expect_text("bob", "to alice 4").await;
    alice.send("mallory", "alice to mallory").await;
    bob.send("mallory", "bob to mallory").await;

    let theirs: HashSet<RoutingTag> = [ab.tag()].into();
    let mut markers: HashSet<RoutingTag> = HashSet::new();
    while markers.len() < 2 {
        match next().await {
            NetEvent::Gossip { data, topic, .. } => {
                let tag = Envelope::decode(&data).unwrap().header.tag;
                assert!(
                    !theirs.contains(&tag) && topic != ab.topic(),
                    "mallory received an envelope of alice and bob's conversation"
                );
                if tag == am.tag() || tag == bm.tag() {
                    markers.insert(tag);
                }
            }
            NetEvent::Subscribed { topic, .. } if joined.insert(topic.clone()) => {
                mallory.send(NetCommand::Subscribe(topic)).await.unwrap();
            }
            NetEvent::Direct { data, .. } => {
                // Offers of mallory's own conversations may come directly
                // too; none of alice and bob's may.
                if let Ok(weft_node::node::DirectRequest::Envelopes(envelopes)) =
                    postcard::from_bytes(&data)
                {
                    for bytes in envelopes {
                        let tag = Envelope::decode(&bytes).unwrap().header.tag;
                        assert!(
                            !theirs.contains(&tag),
                            "alice or bob offered mallory their conversation's envelope"
                        );
                        if tag == am.tag() || tag == bm.tag() {
                            markers.insert(tag);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    mallory.shutdown().await;
}
