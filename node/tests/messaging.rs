//! In-process multi-node tests: alice, bob and carol on the memory
//! transport, one-to-one and group messaging, removal and key rotation,
//! and a node in 150 conversations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestNode, befriend, group_create, poll_until};
use weft_node::api::Request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_both_ways() {
    let alice = TestNode::start("alice", 1, &[]).await;
    let bob = TestNode::start("bob", 1, &[&alice]).await;
    befriend(&alice, &bob).await;
    let sent = alice.send("bob", "hello bob").await;
    assert!(sent["id"].as_str().is_some());
    bob.expect_text("alice", "hello bob").await;
    bob.send("alice", "hello alice").await;
    alice.expect_text("bob", "hello alice").await;
    // Both show the same conversation, in the same order, with the
    // contract's fields.
    let a = alice.messages("bob").await;
    let b = bob.messages("alice").await;
    let ids = |v: &Vec<serde_json::Value>| v.iter().map(|m| m["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b));
    let m = &b[0];
    for field in [
        "id",
        "conversation",
        "sender",
        "sender_name",
        "text",
        "sent_at",
        "status",
        "reply_to",
        "edited",
        "deleted",
        "reactions",
    ] {
        assert!(m.get(field).is_some(), "missing field {field} in {m}");
    }
    assert_eq!(m["sender_name"], "alice");
    // The first message's status became "sent" once bob had it.
    assert_ne!(a[0]["status"], "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_three_and_removed_member_reads_nothing_after() {
    let (alice, bob, carol) = common::trio(2).await;
    alice.send("trio", "hi all").await;
    bob.expect_text("trio", "hi all").await;
    carol.expect_text("trio", "hi all").await;
    bob.send("trio", "bob here").await;
    carol.send("trio", "carol here").await;
    for n in [&alice, &carol] {
        n.expect_text("trio", "bob here").await;
    }
    for n in [&alice, &bob] {
        n.expect_text("trio", "carol here").await;
    }
    // bob and carol are not contacts: the group told them about each other.
    let members = bob
        .call(Request::GroupMembers {
            group: "trio".into(),
        })
        .await;
    assert_eq!(members.as_array().unwrap().len(), 3);

    // Carol is removed: keys rotate; she gets nothing sent after.
    alice
        .call(Request::GroupRemove {
            group: "trio".into(),
            member: "carol".into(),
        })
        .await;
    // Wait until carol knows she was removed.
    common::poll_until("carol never learned of her removal", || async {
        let groups = carol.call(Request::GroupList).await;
        groups.as_array().unwrap().is_empty().then_some(())
    })
    .await;
    let before = common::tag_of(
        &alice.envelope_bytes(alice.messages("trio").await[0]["id"].as_str().unwrap()),
    );
    let after = alice.send("trio", "after carol").await;
    bob.expect_text("trio", "after carol").await;
    // The group's envelopes moved to a new routing tag (and topic) that
    // carol was not told: she cannot tell them apart from anyone else's.
    let after = common::tag_of(&alice.envelope_bytes(after["id"].as_str().unwrap()));
    assert_ne!(before, after);
    assert!(carol.known_tags().contains(&before));
    assert!(
        !carol.known_tags().contains(&after),
        "carol knows the new tag"
    );
    bob.send("trio", "bob after carol").await;
    alice.expect_text("trio", "bob after carol").await;
    let carol_sees = carol.texts("trio").await;
    assert!(
        !carol_sees.iter().any(|t| t.contains("after carol")),
        "{carol_sees:?}"
    );
    // And carol can no longer send to the group.
    let err = carol
        .handle
        .call(Request::Send {
            target: "trio".into(),
            text: "still here?".into(),
            reply_to: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

/// A member who leaves chooses the routing secret of the state saying so:
/// the admin moves the group on to one the leaver never sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_leaves_cannot_follow_the_group() {
    let (alice, bob, carol) = common::trio(4).await;
    alice.send("trio", "hi all").await;
    carol.expect_text("trio", "hi all").await;
    carol
        .call(Request::GroupLeave {
            group: "trio".into(),
        })
        .await;
    poll_until("alice to see carol leave", || async {
        let members = alice
            .call(Request::GroupMembers {
                group: "trio".into(),
            })
            .await;
        (members.as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    let after = alice.send("trio", "after carol left").await;
    bob.expect_text("trio", "after carol left").await;
    let tag = common::tag_of(&alice.envelope_bytes(after["id"].as_str().unwrap()));
    assert!(
        !carol.known_tags().contains(&tag),
        "carol can follow the group"
    );
    assert!(
        !carol
            .texts("trio")
            .await
            .iter()
            .any(|t| t == "after carol left")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_150_conversations() {
    let alice = TestNode::start("alice", 3, &[]).await;
    let bob = TestNode::start("bob", 3, &[&alice]).await;
    befriend(&alice, &bob).await;
    const N: usize = 150;
    for i in 0..N {
        alice.call(group_create(&format!("g{i}"), &["bob"])).await;
    }
    for i in 0..N {
        alice
            .send(&format!("g{i}"), &format!("from alice {i}"))
            .await;
    }
    for i in 0..N {
        bob.expect_text(&format!("g{i}"), &format!("from alice {i}"))
            .await;
    }
    for i in 0..N {
        bob.send(&format!("g{i}"), &format!("from bob {i}")).await;
    }
    for i in 0..N {
        alice
            .expect_text(&format!("g{i}"), &format!("from bob {i}"))
            .await;
    }
    let convs = bob.call(Request::Conversations).await;
    assert_eq!(convs.as_array().unwrap().len(), N + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_send_queues_and_arrives_after_restart() {
    let alice = TestNode::start("alice", 4, &[]).await;
    let mut bob = TestNode::start("bob", 4, &[&alice]).await;
    befriend(&alice, &bob).await;
    let bob_peer = bob.handle.peer_id().to_string();
    bob.stop().await;
    // Until alice has seen bob go, a send is (rightly) "sent".
    poll_until("alice never saw bob go", || async {
        let status = alice.call(Request::Status).await;
        let peers = status["peers"].as_array().unwrap();
        (!peers.iter().any(|p| p["peer_id"] == bob_peer.as_str())).then_some(())
    })
    .await;
    let sent = alice.send("bob", "while you were away").await;
    assert_eq!(sent["status"], "queued");
    let bob_dir = std::mem::replace(&mut bob.dir, tempfile::tempdir().unwrap());
    let bob = {
        let mut restarted = TestNode::start_existing("bob", bob_dir, &[&alice]).await;
        restarted.name = "bob".into();
        restarted
    };
    bob.expect_text("alice", "while you were away").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_contact_messages_are_dropped() {
    let alice = TestNode::start("alice", 5, &[]).await;
    let bob = TestNode::start("bob", 5, &[&alice]).await;
    befriend(&alice, &bob).await;
    bob.send("alice", "first").await;
    alice.expect_text("bob", "first").await;
    alice
        .call(Request::ContactBlock {
            alias: "bob".into(),
        })
        .await;
    let sent = bob.send("alice", "never shown").await;
    let id: weft_node::ids::EnvelopeId = sent["id"].as_str().unwrap().parse().unwrap();
    // Wait until alice's node has the envelope (verified and kept for the
    // group's sake), then check it was not stored as a message.
    let store =
        weft_node::store::Store::open(&alice.dir.path().join("home").join("weft.db")).unwrap();
    common::poll_until("alice never received the envelope", || async {
        store.db().has_envelope(&id).unwrap().then_some(())
    })
    .await;
    assert!(store.db().message(&id).unwrap().is_none());
    assert_eq!(alice.texts("bob").await, vec!["first".to_string()]);
    alice
        .call(Request::ContactUnblock {
            alias: "bob".into(),
        })
        .await;
    bob.send("alice", "after unblock").await;
    alice.expect_text("bob", "after unblock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_find_each_other_through_the_dht() {
    // bob and carol only know alice's address; the group makes them
    // members of one conversation and the DHT tells each where the other is.
    let alice = TestNode::start("alice", 6, &[]).await;
    let bob = TestNode::start("bob", 6, &[&alice]).await;
    let carol = TestNode::start("carol", 6, &[&alice]).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    alice.call(group_create("dht", &["bob", "carol"])).await;
    alice.send("dht", "hello").await;
    carol.expect_text("dht", "hello").await;
    let carol_peer = carol.handle.peer_id().to_string();
    common::poll_until("bob and carol never met through the DHT", || async {
        let status = bob.call(Request::Status).await;
        let found = status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer_id"] == carol_peer.as_str() && p["source"] == "dht");
        let inbound = carol.call(Request::Status).await["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| {
                p["peer_id"] == bob.handle.peer_id().to_string().as_str() && p["source"] == "dht"
            });
        (found || inbound).then_some(())
    })
    .await;
}
