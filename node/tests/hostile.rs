//! Hostile peers: garbage and forgeries on a conversation's topic are
//! rejected, never stored or shown, and the sender is banned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DEADLINE, TestNode, befriend};
use weft_node::ids::{ConversationId, UserId};
use weft_node::net::{self, NetCommand, NetConfig, NetEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_topic_gets_the_sender_banned() {
    let alice = TestNode::start("alice", 20, &[]).await;
    let bob = TestNode::start("bob", 20, &[&alice]).await;
    befriend(&alice, &bob).await;
    alice.send("bob", "before").await;
    bob.expect_text("alice", "before").await;

    // Mallory is a bare libp2p node that joins alice and bob's topic.
    let alice_user: UserId = alice.call(weft_node::api::Request::Id).await["user_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let bob_user: UserId = bob.call(weft_node::api::Request::Id).await["user_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let topic = ConversationId::direct(&alice_user, &bob_user).topic();
    let mut config = NetConfig::memory(
        alice
            .addr
            .to_string()
            .trim_start_matches("/memory/")
            .parse::<u64>()
            .unwrap()
            + 500_000,
    );
    config.bootstrap = vec![
        format!("{}/p2p/{}", alice.addr, alice.handle.peer_id())
            .parse()
            .unwrap(),
    ];
    let (mallory, mut events, _) = net::spawn(
        weft_node::identity::Identity::from_seed(b"mallory", 0)
            .unwrap()
            .libp2p_keypair()
            .unwrap(),
        config,
    )
    .unwrap();
    mallory
        .send(NetCommand::Subscribe(topic.clone()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            NetEvent::Subscribed { peer, topic: t }
                if peer == alice.handle.peer_id() && t == topic =>
            {
                break;
            }
            _ => {}
        }
    }
    // Malformed envelopes and a forged one: a valid-looking header whose
    // signature is wrong.
    for i in 0..(net::MAX_STRIKES + 4) {
        let mut data = vec![1u8; 120];
        data[1..9].copy_from_slice(&u64::from(i).to_be_bytes());
        mallory
            .send(NetCommand::Publish {
                topic: topic.clone(),
                data,
            })
            .await
            .unwrap();
    }
    // Alice bans mallory: the connection goes and does not come back.
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(NetEvent::Disconnected { peer })) if peer == alice.handle.peer_id() => break,
            Ok(Some(_)) => {}
            other => panic!("mallory was never disconnected: {other:?}"),
        }
    }
    let status = mallory.status().await.unwrap();
    assert!(
        status
            .peers
            .iter()
            .all(|p| p.peer_id != alice.handle.peer_id())
    );
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
    let alice_user: UserId = alice.call(weft_node::api::Request::Id).await["user_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let bob_user: UserId = bob.call(weft_node::api::Request::Id).await["user_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let topic = ConversationId::direct(&alice_user, &bob_user).topic();
    // Mallory listens on the topic (she cannot read it) and records.
    let mut config = NetConfig::memory(
        alice
            .addr
            .to_string()
            .trim_start_matches("/memory/")
            .parse::<u64>()
            .unwrap()
            + 600_000,
    );
    config.bootstrap = vec![
        format!("{}/p2p/{}", alice.addr, alice.handle.peer_id())
            .parse()
            .unwrap(),
        format!("{}/p2p/{}", bob.addr, bob.handle.peer_id())
            .parse()
            .unwrap(),
    ];
    let key = weft_node::identity::Identity::from_seed(b"mallory2", 0)
        .unwrap()
        .libp2p_keypair()
        .unwrap();
    let (mallory, mut events, _) = net::spawn(key, config).unwrap();
    mallory
        .send(NetCommand::Subscribe(topic.clone()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            NetEvent::Subscribed { peer, topic: t }
                if peer == alice.handle.peer_id() && t == topic =>
            {
                break;
            }
            _ => {}
        }
    }
    alice.send("bob", "once").await;
    let captured = loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap();
        if let NetEvent::Gossip { data, .. } = event {
            break data;
        }
    };
    bob.expect_text("alice", "once").await;
    // Replay it to bob directly, several times.
    for _ in 0..3 {
        let request = postcard::to_stdvec(&weft_node::node::DirectRequest::Envelopes(vec![
            captured.clone(),
        ]))
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        mallory
            .send(NetCommand::Direct {
                peer: bob.handle.peer_id(),
                data: request,
                reply: tx,
            })
            .await
            .unwrap();
        let reply = tokio::time::timeout_at(deadline, rx)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(
            postcard::from_bytes::<weft_node::node::DirectResponse>(&reply).unwrap(),
            weft_node::node::DirectResponse::Ack { .. }
        ));
    }
    alice.send("bob", "twice?").await;
    bob.expect_text("alice", "twice?").await;
    assert_eq!(
        bob.texts("alice").await,
        vec!["once".to_string(), "twice?".to_string()]
    );
}
