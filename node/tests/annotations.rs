//! Edits, deletions and reactions between alice, bob and carol (in
//! process, memory transport): every member converges on the same
//! materialised messages; only those allowed may change a message; what
//! happened while a member was away reaches it, in whatever order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestNode, befriend, group_create};
use serde_json::Value;
use weft_node::api::Request;

fn edit(id: &str, text: &str) -> Request {
    Request::Edit {
        id: id.into(),
        text: text.into(),
    }
}

fn react(id: &str, emoji: &str, remove: bool) -> Request {
    Request::React {
        id: id.into(),
        emoji: emoji.into(),
        remove,
    }
}

/// The message `id` as `node` shows it, once `check` holds.
async fn wait_for(
    node: &TestNode,
    target: &str,
    id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let ms = node
        .wait_messages(target, what, |ms| {
            ms.iter().any(|m| m["id"] == id && check(m))
        })
        .await;
    ms.into_iter().find(|m| m["id"] == id).unwrap()
}

/// The fields every replica must agree on.
fn shown(m: &Value) -> Value {
    serde_json::json!({
        "text": m["text"], "edited": m["edited"], "deleted": m["deleted"],
        "reactions": m["reactions"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_reactions_and_a_deletion_reach_every_member() {
    let (alice, bob, carol) = common::trio(31).await;
    let id = alice.send("trio", "see you at 7").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.expect_text("trio", "see you at 7").await;
    carol.expect_text("trio", "see you at 7").await;

    let edited = alice.call(edit(&id, "see you at 8")).await;
    assert_eq!(edited["text"], "see you at 8");
    assert_eq!(edited["edited"], true);
    bob.call(react(&id, "👍", false)).await;
    carol.call(react(&id, "👍", false)).await;
    carol.call(react(&id, "🎉", false)).await;
    carol.call(react(&id, "🎉", true)).await;
    let bob_id = bob.call(Request::Id).await["user_id"].clone();
    let carol_id = carol.call(Request::Id).await["user_id"].clone();
    let mut expected_reactors = vec![bob_id, carol_id];
    expected_reactors.sort_by_key(|v| v.as_str().unwrap_or_default().to_string());
    let settled = |m: &Value| {
        m["text"] == "see you at 8"
            && m["reactions"].as_object().is_some_and(|r| r.len() == 1)
            && m["reactions"]["👍"]
                .as_array()
                .is_some_and(|u| u.len() == 2)
    };
    let mut views = Vec::new();
    for node in [&alice, &bob, &carol] {
        views.push(shown(
            &wait_for(node, "trio", &id, "the edit and two 👍", settled).await,
        ));
    }
    assert_eq!(views[0], views[1]);
    assert_eq!(views[1], views[2]);
    let mut reactors = views[0]["reactions"]["👍"].as_array().cloned().unwrap();
    reactors.sort_by_key(|v| v.as_str().unwrap_or_default().to_string());
    assert_eq!(reactors, expected_reactors);

    // Only the sender edits; a member who is not an admin deletes nothing
    // of others'.
    let refused = bob.handle.call(edit(&id, "hijacked")).await.unwrap_err();
    assert!(refused.to_string().contains("only the sender"), "{refused}");
    let refused = bob
        .handle
        .call(Request::Delete { id: id.clone() })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("admin"), "{refused}");
    let bad = alice.handle.call(react(&id, "", false)).await.unwrap_err();
    assert!(bad.to_string().contains("reaction"), "{bad}");

    // Alice deletes it: gone everywhere, a tombstone stays.
    alice.call(Request::Delete { id: id.clone() }).await;
    for node in [&alice, &bob, &carol] {
        let m = wait_for(node, "trio", &id, "the deletion", |m| m["deleted"] == true).await;
        assert_eq!(m["text"], "");
        assert_eq!(m["edited"], false);
        assert_eq!(m["reactions"], serde_json::json!({}));
    }
    let refused = alice.handle.call(edit(&id, "back")).await.unwrap_err();
    assert!(refused.to_string().contains("deleted"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_a_member_was_away_reach_it() {
    let alice = TestNode::start("alice", 32, &[]).await;
    let mut bob = TestNode::start("bob", 32, &[&alice]).await;
    befriend(&alice, &bob).await;
    let kept = alice.send("bob", "first draft").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let gone = alice.send("bob", "oops").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.expect_text("alice", "oops").await;
    bob.stop().await;

    // While bob is away: an edit, a second edit, a deletion, and a
    // message that is edited before bob ever saw it.
    alice.call(edit(&kept, "second draft")).await;
    alice.call(edit(&kept, "final draft")).await;
    alice.call(Request::Delete { id: gone.clone() }).await;
    let late = alice.send("bob", "late").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    alice.call(edit(&late, "late, edited")).await;
    alice.call(react(&late, "👀", false)).await;

    let bob = TestNode::start_existing("bob", bob.dir, &[&alice]).await;
    let ms = bob
        .wait_messages("alice", "everything alice changed", |ms| {
            let by_id = |id: &str| ms.iter().find(|m| m["id"] == id);
            by_id(&kept).is_some_and(|m| m["text"] == "final draft")
                && by_id(&gone).is_some_and(|m| m["deleted"] == true)
                && by_id(&late)
                    .is_some_and(|m| m["text"] == "late, edited" && m["reactions"]["👀"].is_array())
        })
        .await;
    let mine = alice.messages("bob").await;
    let view = |ms: &[Value]| {
        ms.iter()
            .map(|m| (m["id"].clone(), shown(m)))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&ms), view(&mine), "bob shows what alice shows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_later_sees_reactions_to_what_it_can_read() {
    let alice = TestNode::start("alice", 33, &[]).await;
    let bob = TestNode::start("bob", 33, &[&alice]).await;
    let carol = TestNode::start("carol", 33, &[&alice, &bob]).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    alice.call(group_create("duo", &["bob"])).await;
    // Annotations carol will never see: the shard of this period has
    // changes before she joins.
    let early = alice.send("duo", "before carol").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.expect_text("duo", "before carol").await;
    bob.call(react(&early, "👍", false)).await;
    alice.call(react(&early, "🎉", false)).await;
    wait_for(&bob, "duo", &early, "both reactions", |m| {
        m["reactions"]["🎉"].is_array()
    })
    .await;

    alice
        .call(Request::GroupAdd {
            group: "duo".into(),
            member: "carol".into(),
        })
        .await;
    let later = alice.send("duo", "carol is here").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.expect_text("duo", "carol is here").await;
    carol.expect_text("duo", "carol is here").await;
    bob.call(react(&later, "👋", false)).await;
    alice.call(edit(&later, "carol is here!")).await;
    let seen = wait_for(&carol, "duo", &later, "bob's wave and alice's edit", |m| {
        m["reactions"]["👋"].is_array() && m["text"] == "carol is here!"
    })
    .await;
    let on_bob = wait_for(&bob, "duo", &later, "the edit", |m| {
        m["text"] == "carol is here!"
    })
    .await;
    assert_eq!(shown(&seen), shown(&on_bob));
    assert!(
        !carol.texts("duo").await.iter().any(|t| t == "before carol"),
        "carol reads nothing from before she joined"
    );
}

/// A long chain of changes to one shard, arriving newest first in one
/// batch: each change waits for the one before it, and every one is
/// applied in the end (none is taken from waiting and then dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chain_of_edits_arriving_newest_first_is_applied_whole() {
    const EDITS: usize = 12;
    let mut alice = TestNode::start("alice", 34, &[]).await;
    let mut bob = TestNode::start("bob", 34, &[&alice]).await;
    befriend(&alice, &bob).await;
    let id = alice.send("bob", "draft 0").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.expect_text("alice", "draft 0").await;
    alice.stop().await;
    bob.stop().await;
    let alice = TestNode::start_offline("alice", alice.dir).await;
    let bob = TestNode::start_offline("bob", bob.dir).await;

    // Each edit builds on the one before it in the message's shard.
    let mut edits = Vec::new();
    for n in 1..=EDITS {
        let before = alice.chain_envelopes(|_| true);
        alice.call(edit(&id, &format!("draft {n}"))).await;
        let new: Vec<Vec<u8>> = alice
            .chain_envelopes(|_| true)
            .into_iter()
            .filter(|e| !before.contains(e))
            .collect();
        assert_eq!(new.len(), 1, "one envelope carries edit {n}");
        edits.extend(new);
    }
    edits.reverse();
    bob.handle.deliver(edits).await.unwrap();
    let last = format!("draft {EDITS}");
    wait_for(&bob, "alice", &id, "the last edit", |m| {
        m["text"] == last.as_str()
    })
    .await;
}

/// A reaction to a message that a member never receives (it was deleted,
/// and its envelope erased, before the member met anyone holding it) must
/// not hold back the changes that build on it: the deletion and every
/// later change of the shard. (Found by the partitions test: a device
/// stopped taking in a conversation's reactions and edits for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_about_a_message_never_received_holds_nothing_back() {
    let (mut alice, mut bob, mut carol) = common::trio(35).await;
    alice.send("trio", "hello, trio").await;
    for node in [&bob, &carol] {
        node.expect_text("trio", "hello, trio").await;
    }
    for node in [&mut alice, &mut bob, &mut carol] {
        node.stop().await;
    }
    let alice = TestNode::start_offline("alice", alice.dir).await;
    let bob = TestNode::start_offline("bob", bob.dir).await;
    let carol = TestNode::start_offline("carol", carol.dir).await;

    // Alice's message reaches bob only; bob reacts; alice, having seen
    // the reaction, deletes the message (her deletion builds on it).
    let gone = alice.send("trio", "soon gone").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let gone_envelope = alice.envelope_bytes(&gone);
    bob.handle.deliver(alice.all_envelopes()).await.unwrap();
    bob.expect_text("trio", "soon gone").await;
    bob.call(react(&gone, "🎉", false)).await;
    alice.handle.deliver(bob.all_envelopes()).await.unwrap();
    wait_for(&alice, "trio", &gone, "bob's reaction", |m| {
        m["reactions"]["🎉"].is_array()
    })
    .await;
    alice.call(Request::Delete { id: gone.clone() }).await;

    // Then a message and a reaction to it, in the same shard.
    let kept = alice.send("trio", "still here").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    alice.call(react(&kept, "👍", false)).await;

    // Carol gets everything but the deleted message itself.
    let mut rest = alice.all_envelopes();
    rest.extend(bob.all_envelopes());
    rest.retain(|e| *e != gone_envelope);
    carol.handle.deliver(rest).await.unwrap();
    wait_for(
        &carol,
        "trio",
        &kept,
        "alice's reaction to a later message",
        |m| m["reactions"]["👍"].is_array(),
    )
    .await;

    // Should the deleted message come after all, it shows deleted.
    carol.handle.deliver(vec![gone_envelope]).await.unwrap();
    let m = wait_for(&carol, "trio", &gone, "the deleted message", |m| {
        m["deleted"] == true
    })
    .await;
    assert_eq!(m["text"], "", "carol never shows the deleted text");
    assert_eq!(m["reactions"], serde_json::json!({}));
}
