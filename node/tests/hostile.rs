//! Hostile peers: garbage and forgeries on a conversation's topic are
//! rejected, never stored or shown, and the sender is banned; a replayed
//! envelope is stored and shown once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DEADLINE, TestNode, befriend};
use tokio::sync::mpsc;
use weft_node::api::Request;
use weft_node::ids::{ConversationId, UserId};
use weft_node::net::{self, NetCommand, NetConfig, NetEvent, NetHandle};
use weft_node::node::{DirectRequest, DirectResponse};

/// A bare libp2p node (not a Weft node) on the memory transport, connected
/// to `peers` and subscribed to the one-to-one topic of `a` and `b`. She can
/// see ciphertext on the topic but read nothing.
struct Mallory {
    net: NetHandle,
    events: mpsc::Receiver<NetEvent>,
    topic: String,
}

async fn user_of(node: &TestNode) -> UserId {
    node.call(Request::Id).await["user_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

impl Mallory {
    async fn join(
        seed: &[u8],
        port_offset: u64,
        a: &TestNode,
        b: &TestNode,
        peers: &[&TestNode],
    ) -> Self {
        let topic = ConversationId::direct(&user_of(a).await, &user_of(b).await).topic();
        let mut config = NetConfig::memory(a.port() + port_offset);
        config.bootstrap = peers.iter().map(|n| n.dial_addr()).collect();
        let key = weft_node::identity::Identity::from_seed(seed, 0)
            .unwrap()
            .libp2p_keypair()
            .unwrap();
        let (net, events, _) = net::spawn(key, config).unwrap();
        net.send(NetCommand::Subscribe(topic.clone()))
            .await
            .unwrap();
        let mut mallory = Self { net, events, topic };
        // Publishing works once she knows `a` is on the topic.
        let topic = mallory.topic.clone();
        let a_peer = a.handle.peer_id();
        mallory
            .next(|ev| matches!(ev, NetEvent::Subscribed { peer, topic: t } if *peer == a_peer && *t == topic))
            .await;
        mallory
    }

    /// The next event matching `wanted`, within the deadline.
    async fn next(&mut self, wanted: impl Fn(&NetEvent) -> bool) -> NetEvent {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if wanted(&ev) => return ev,
                Ok(Some(_)) => {}
                other => panic!("mallory never saw the expected event: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_topic_gets_the_sender_banned() {
    let alice = TestNode::start("alice", 20, &[]).await;
    let bob = TestNode::start("bob", 20, &[&alice]).await;
    befriend(&alice, &bob).await;
    alice.send("bob", "before").await;
    bob.expect_text("alice", "before").await;
    let mut mallory = Mallory::join(b"mallory", 500_000, &alice, &bob, &[&alice]).await;
    // Envelopes of the right version byte but garbage after it, each
    // different so gossipsub's own dedup does not hide them.
    for i in 0..(net::MAX_STRIKES + 4) {
        let mut data = vec![1u8; 120];
        data[1..9].copy_from_slice(&u64::from(i).to_be_bytes());
        let publish = NetCommand::Publish {
            topic: mallory.topic.clone(),
            data,
        };
        mallory.net.send(publish).await.unwrap();
    }
    // Alice bans mallory: the connection goes and does not come back.
    let alice_peer = alice.handle.peer_id();
    mallory
        .next(|ev| matches!(ev, NetEvent::Disconnected { peer } if *peer == alice_peer))
        .await;
    let status = mallory.net.status().await.unwrap();
    assert!(status.peers.iter().all(|p| p.peer_id != alice_peer));
    // Nothing of it was stored, and alice and bob still talk.
    assert_eq!(bob.texts("alice").await, vec!["before".to_string()]);
    alice.send("bob", "after").await;
    bob.expect_text("alice", "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_envelope_is_stored_once() {
    let alice = TestNode::start("alice", 21, &[]).await;
    let bob = TestNode::start("bob", 21, &[&alice]).await;
    befriend(&alice, &bob).await;
    let mut mallory = Mallory::join(b"mallory2", 600_000, &alice, &bob, &[&alice, &bob]).await;
    alice.send("bob", "once").await;
    let NetEvent::Gossip { data: captured, .. } = mallory
        .next(|ev| matches!(ev, NetEvent::Gossip { .. }))
        .await
    else {
        unreachable!("matched a gossip event")
    };
    bob.expect_text("alice", "once").await;
    // Replay it to bob directly, several times.
    for _ in 0..3 {
        let request =
            postcard::to_stdvec(&DirectRequest::Envelopes(vec![captured.clone()])).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let direct = NetCommand::Direct {
            peer: bob.handle.peer_id(),
            data: request,
            reply: tx,
        };
        mallory.net.send(direct).await.unwrap();
        let reply = tokio::time::timeout(DEADLINE, rx)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(
            postcard::from_bytes::<DirectResponse>(&reply).unwrap(),
            DirectResponse::Ack { .. }
        ));
    }
    alice.send("bob", "twice?").await;
    bob.expect_text("alice", "twice?").await;
    assert_eq!(
        bob.texts("alice").await,
        vec!["once".to_string(), "twice?".to_string()]
    );
}
