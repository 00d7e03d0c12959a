//! Several devices per account, in process: alice links a second device
//! with a one-time code; it gets her history; messages to alice reach both
//! devices; what the second device sends reaches bob and shows on the
//! first as alice's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestNode, befriend, link};
use weft_node::api::Request;

fn count(ms: &[serde_json::Value], prefix: &str) -> usize {
    ms.iter()
        .filter(|m| m["text"].as_str().is_some_and(|t| t.starts_with(prefix)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_gets_history_and_new_messages_and_speaks_for_the_account() {
    let (alice, bob, carol) = common::trio(51).await;
    for i in 0..5 {
        alice.send("bob", &format!("before-{i}")).await;
        alice.send("trio", &format!("group-before-{i}")).await;
    }
    bob.send("alice", "before-from-bob").await;
    bob.wait_messages("alice", "alice's five", |ms| count(ms, "before-") == 6)
        .await;

    let phone = link(&alice, "alice-phone", &[&alice, &bob, &carol]).await;
    // History: every conversation, with statuses.
    let history = phone
        .wait_messages("bob", "the history with bob", |ms| {
            count(ms, "before-") == 6
        })
        .await;
    assert!(
        history
            .iter()
            .filter(|m| m["text"].as_str().unwrap().starts_with("before-")
                && m["text"] != "before-from-bob")
            .all(|m| m["outgoing"] == true && m["status"] != "queued"),
        "alice's messages show as hers, with their status: {history:?}"
    );
    phone
        .wait_messages("trio", "the group history", |ms| {
            count(ms, "group-before-") == 5
        })
        .await;
    // Unread on the laptop ("before-from-bob"), so unread on the phone.
    let unread_with_bob = |list: serde_json::Value| {
        list.as_array()
            .and_then(|cs| cs.iter().find(|c| c["kind"] == "direct"))
            .and_then(|c| c["unread"].as_u64())
    };
    assert_eq!(
        unread_with_bob(alice.call(Request::Conversations).await),
        Some(1)
    );
    assert_eq!(
        unread_with_bob(phone.call(Request::Conversations).await),
        Some(1)
    );
    let devices = alice.call(Request::DevicesList).await;
    assert_eq!(devices.as_array().unwrap().len(), 2, "{devices}");

    // New messages to alice reach both devices.
    bob.send("alice", "to both").await;
    alice.expect_text("bob", "to both").await;
    phone.expect_text("bob", "to both").await;
    carol.send("trio", "group to both").await;
    alice.expect_text("trio", "group to both").await;
    phone.expect_text("trio", "group to both").await;

    // The phone speaks for alice; the first device shows it as hers.
    phone.send("bob", "from the phone").await;
    bob.expect_text("alice", "from the phone").await;
    let mine = alice
        .wait_messages("bob", "the phone's message", |ms| {
            ms.iter().any(|m| m["text"] == "from the phone")
        })
        .await;
    let m = mine.iter().find(|m| m["text"] == "from the phone").unwrap();
    assert_eq!(m["outgoing"], true);
    phone.send("trio", "group from the phone").await;
    carol.expect_text("trio", "group from the phone").await;
    alice.expect_text("trio", "group from the phone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_linked_to_1000_messages_of_history_gets_them_all_in_order() {
    let alice = TestNode::start("alice", 52, &[]).await;
    let bob = TestNode::start("bob", 52, &[&alice]).await;
    befriend(&alice, &bob).await;
    for i in 0..500 {
        alice.send("bob", &format!("a{i:03}")).await;
        bob.send("alice", &format!("b{i:03}")).await;
    }
    alice
        .wait_messages("bob", "the thousand", |ms| ms.len() == 1000)
        .await;
    // Let alice's own messages settle on "delivered" (bob's receipts).
    let expected = alice
        .wait_messages("bob", "delivered everywhere", |ms| {
            ms.iter()
                .filter(|m| m["outgoing"] == true)
                .all(|m| m["status"] == "delivered")
        })
        .await;
    let phone = link(&alice, "alice-phone", &[&alice]).await;
    let got = phone
        .wait_messages("bob", "the thousand on the phone", |ms| ms.len() >= 1000)
        .await;
    let view = |ms: &[serde_json::Value]| {
        ms.iter()
            .map(|m| {
                (
                    m["id"].clone(),
                    m["text"].clone(),
                    m["status"].clone(),
                    m["outgoing"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        view(&got),
        view(&expected),
        "all of them, in order, with statuses"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_of_one_message_on_two_devices_converge() {
    let mut alice = TestNode::start("alice", 53, &[]).await;
    let bob = TestNode::start("bob", 53, &[&alice]).await;
    befriend(&alice, &bob).await;
    let id = alice.send("bob", "draft").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.expect_text("alice", "draft").await;
    let mut phone = link(&alice, "alice-phone", &[&alice, &bob]).await;
    phone.expect_text("bob", "draft").await;

    // Apart: each device edits without seeing the other's edit.
    phone.stop().await;
    alice
        .call(Request::Edit {
            id: id.clone(),
            text: "edited on the laptop".into(),
        })
        .await;
    bob.expect_text("alice", "edited on the laptop").await;
    alice.stop().await;
    let phone_dir = phone.dir;
    let phone = TestNode::start_existing("alice-phone", phone_dir, &[&bob]).await;
    phone
        .call(Request::Edit {
            id: id.clone(),
            text: "edited on the phone".into(),
        })
        .await;
    let alice = TestNode::start_existing("alice", alice.dir, &[&bob, &phone]).await;

    // Together again: one result everywhere.
    let shown = |ms: &[serde_json::Value]| {
        ms.iter()
            .find(|m| m["id"] == id.as_str())
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
    };
    let mut results = Vec::new();
    for node in [&alice, &phone, &bob] {
        let target = if node.name == "bob" { "alice" } else { "bob" };
        let ms = node
            .wait_messages(target, "the later edit", |ms| {
                shown(ms).as_deref() == Some("edited on the phone")
            })
            .await;
        results.push(shown(&ms));
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
}

/// Waits until `node` counts `devices` devices for its contact `alias`.
async fn wait_contact_devices(node: &TestNode, alias: &str, devices: u64) {
    let what = format!("{}: {alias} never had {devices} devices", node.name);
    common::poll_until(&what, || async {
        let list = node.call(Request::ContactList).await;
        let count = list
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["alias"] == alias))
            .and_then(|c| c["devices"].as_u64());
        (count == Some(devices)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_reads_nothing_sent_after_and_cannot_act_for_the_account() {
    let (alice, bob, carol) = common::trio(54).await;
    let mut phone = link(&alice, "alice-phone", &[&alice, &bob, &carol]).await;
    // The phone holds every member's chain in both conversations.
    bob.send("alice", "bob, before").await;
    carol.send("trio", "carol, before").await;
    alice.send("trio", "alice, before").await;
    phone.expect_text("bob", "bob, before").await;
    phone.expect_text("trio", "carol, before").await;
    phone.expect_text("trio", "alice, before").await;
    wait_contact_devices(&bob, "alice", 2).await;
    wait_contact_devices(&carol, "alice", 2).await;
    let phone_id = phone.call(Request::Id).await["device_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The phone goes away (stolen, say) and is kept off the network: from
    // here on it hears only what the test hands it. Something it seals
    // now, while still trusted, is kept for later.
    phone.stop().await;
    let phone = TestNode::start_offline("alice-phone", phone.dir).await;
    let impostor = phone.send("bob", "sent by the stolen phone").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let impostor = phone.envelope_bytes(&impostor);
    // A control: what bob sends before the revocation, the phone reads.
    let control = bob.send("alice", "bob, still before").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    alice.expect_text("bob", "bob, still before").await;
    phone
        .handle
        .deliver(vec![bob.envelope_bytes(&control)])
        .await
        .unwrap();
    phone.expect_text("bob", "bob, still before").await;

    // Revoked by a prefix of its id.
    let revoked = alice
        .call(Request::DevicesRevoke {
            device: phone_id[..10].to_string(),
        })
        .await;
    assert_eq!(revoked["device_id"], phone_id.as_str());
    assert_eq!(revoked["conversations_rekeyed"], 3, "{revoked}");
    assert_eq!(
        alice
            .call(Request::DevicesList)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let again = alice
        .handle
        .call(Request::DevicesRevoke {
            device: phone_id.clone(),
        })
        .await;
    assert!(again.is_err(), "revoking twice is a clear error");
    wait_contact_devices(&bob, "alice", 1).await;
    wait_contact_devices(&carol, "alice", 1).await;

    // Everything sent after the revocation, by every member, in both
    // conversations: the members read it, the phone cannot.
    let mut after = Vec::new();
    for (node, target, text) in [
        (&bob, "alice", "bob, after"),
        (&carol, "trio", "carol, after"),
        (&alice, "bob", "alice, after"),
        (&alice, "trio", "alice to the group, after"),
    ] {
        let id = node.send(target, text).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        after.push((node.envelope_bytes(&id), text));
    }
    alice.expect_text("bob", "bob, after").await;
    alice.expect_text("trio", "carol, after").await;
    bob.expect_text("alice", "alice, after").await;
    carol.expect_text("trio", "alice to the group, after").await;
    bob.expect_text("trio", "alice to the group, after").await;
    for (bytes, text) in after {
        phone.handle.deliver(vec![bytes]).await.unwrap();
        for target in ["bob", "trio"] {
            assert!(
                !phone.texts(target).await.iter().any(|t| t == text),
                "the revoked phone read {text:?}"
            );
        }
    }

    // What the phone sealed, arriving after the revocation, is refused.
    for node in [&bob, &alice] {
        node.handle.deliver(vec![impostor.clone()]).await.unwrap();
    }
    assert!(
        !bob.texts("alice")
            .await
            .iter()
            .any(|t| t == "sent by the stolen phone")
    );
    assert!(
        !alice
            .texts("bob")
            .await
            .iter()
            .any(|t| t == "sent by the stolen phone")
    );
}

/// Waits until `check` holds for what `node` answers to `req`.
async fn wait_for(
    node: &TestNode,
    req: Request,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let what = format!("{}: timed out waiting for {what}", node.name);
    common::poll_until(&what, || async {
        let got = node.call(req.clone()).await;
        check(&got).then_some(())
    })
    .await;
}

fn contact<'a>(list: &'a serde_json::Value, alias: &str) -> Option<&'a serde_json::Value> {
    list.as_array()?.iter().find(|c| c["alias"] == alias)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_blocks_reads_and_privacy_follow_the_account_to_every_device() {
    let alice = TestNode::start("alice", 55, &[]).await;
    let bob = TestNode::start("bob", 55, &[&alice]).await;
    let carol = TestNode::start("carol", 55, &[&alice, &bob]).await;
    befriend(&alice, &bob).await;
    let phone = link(&alice, "alice-phone", &[&alice, &bob, &carol]).await;
    wait_for(&phone, Request::ContactList, "bob, from history", |l| {
        contact(l, "bob").is_some()
    })
    .await;

    // A contact added on one device appears on the other, from its invite.
    befriend(&alice, &carol).await;
    wait_for(&phone, Request::ContactList, "carol", |l| {
        contact(l, "carol").is_some_and(|c| c["devices"] == 1)
    })
    .await;
    carol.send("alice", "hello both of you").await;
    phone.expect_text("carol", "hello both of you").await;

    // A block on the phone holds on the laptop.
    phone
        .call(Request::ContactBlock {
            alias: "bob".into(),
        })
        .await;
    wait_for(&alice, Request::ContactList, "bob blocked", |l| {
        contact(l, "bob").is_some_and(|c| c["blocked"] == true)
    })
    .await;

    // Presence privacy set on the phone.
    phone
        .call(Request::Privacy {
            presence: Some("nobody".into()),
        })
        .await;
    wait_for(
        &alice,
        Request::Privacy { presence: None },
        "privacy",
        |p| p["presence"] == "nobody",
    )
    .await;

    // Read on the laptop: read on the phone.
    for i in 0..3 {
        carol.send("alice", &format!("unread {i}")).await;
    }
    phone.expect_text("carol", "unread 2").await;
    alice.expect_text("carol", "unread 2").await;
    let unread = |l: &serde_json::Value| {
        l.as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "carol"))
            .and_then(|c| c["unread"].as_u64())
    };
    wait_for(&phone, Request::Conversations, "unread on the phone", |l| {
        unread(l) == Some(4)
    })
    .await;
    alice
        .call(Request::Read {
            target: "carol".into(),
        })
        .await;
    wait_for(&phone, Request::Conversations, "read on the phone", |l| {
        unread(l) == Some(0)
    })
    .await;
    let ms = phone.messages("carol").await;
    assert!(ms.iter().all(|m| m["status"] == "read"), "{ms:?}");

    // A removal on the laptop.
    alice
        .call(Request::ContactRemove {
            alias: "carol".into(),
        })
        .await;
    wait_for(&phone, Request::ContactList, "carol gone", |l| {
        contact(l, "carol").is_none()
    })
    .await;
    // The account's own conversation stays out of sight, and out of reach.
    let convs = phone.call(Request::Conversations).await;
    assert_eq!(convs.as_array().map(Vec::len), Some(2), "{convs}");
    let me = phone.call(Request::Id).await["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let to_self = phone
        .handle
        .call(Request::Send {
            target: me,
            text: "note to self".into(),
            reply_to: None,
        })
        .await;
    assert!(to_self.is_err(), "{to_self:?}");
}

/// The account's own conversation: the one no list shows.
fn account_conversation(c: &weft_node::store::ConversationRecord) -> bool {
    c.name.is_empty() && c.kind == weft_node::store::ConversationKind::Direct
}

/// Reading on one device says so twice to the others: a read receipt in
/// the conversation and a read position in the account's state. Whichever
/// arrives first, the other device ends with nothing unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_receipt_before_the_read_position_still_clears_the_unread_count() {
    let mut alice = TestNode::start("alice", 57, &[]).await;
    let mut carol = TestNode::start("carol", 57, &[&alice]).await;
    befriend(&alice, &carol).await;
    let mut phone = link(&alice, "alice-phone", &[&alice, &carol]).await;
    for i in 0..3 {
        carol.send("alice", &format!("unread {i}")).await;
    }
    // All three on both devices (they may arrive in any order), and carol
    // a contact on the phone too.
    for i in 0..3 {
        phone.expect_text("carol", &format!("unread {i}")).await;
        alice.expect_text("carol", &format!("unread {i}")).await;
    }
    wait_for(&phone, Request::ContactList, "carol", |l| {
        contact(l, "carol").is_some()
    })
    .await;
    let conv = alice.call(Request::Conversations).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Off the network: the test hands the phone what the laptop sends, in
    // the order it picks.
    alice.stop().await;
    phone.stop().await;
    carol.stop().await;
    let alice = TestNode::start_offline("alice", alice.dir).await;
    let phone = TestNode::start_offline("alice-phone", phone.dir).await;
    let unread = |node: &TestNode| {
        let (node, conv) = (node.handle.clone(), conv.clone());
        async move {
            let l = node.call(Request::Conversations).await.unwrap().to_json();
            let carol = l
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["id"] == conv.as_str()));
            (carol.and_then(|c| c["unread"].as_u64()), l)
        }
    };
    let (before, list) = unread(&phone).await;
    assert_eq!(before, Some(3), "{list}");
    let (receipts_before, account_before) = (
        alice.chain_envelopes(|c| c.id.to_string() == conv),
        alice.chain_envelopes(account_conversation),
    );
    // What the laptop sent before (key handouts, delivered receipts,
    // account changes) may not all have reached the phone before it went
    // offline. It gets them first, so that only the order of the two new
    // envelopes is under test.
    let earlier: Vec<Vec<u8>> = alice
        .sealed_envelopes(|c| c.id.to_string() == conv || account_conversation(c))
        .into_iter()
        .chain(receipts_before.iter().cloned())
        .chain(account_before.iter().cloned())
        .collect();
    phone.handle.deliver(earlier).await.unwrap();
    assert_eq!(unread(&phone).await.0, Some(3), "after what came before");
    alice
        .call(Request::Read {
            target: "carol".into(),
        })
        .await;
    let receipt: Vec<Vec<u8>> = alice
        .chain_envelopes(|c| c.id.to_string() == conv)
        .difference(&receipts_before)
        .cloned()
        .collect();
    let position: Vec<Vec<u8>> = alice
        .chain_envelopes(account_conversation)
        .difference(&account_before)
        .cloned()
        .collect();
    assert_eq!((receipt.len(), position.len()), (1, 1));

    assert_eq!(phone.handle.deliver(receipt).await.unwrap(), 1);
    assert_eq!(unread(&phone).await.0, Some(0), "after the receipt");
    assert_eq!(phone.handle.deliver(position).await.unwrap(), 1);
    assert_eq!(unread(&phone).await.0, Some(0), "after the read position");
    let ms = phone.messages("carol").await;
    assert!(ms.iter().all(|m| m["status"] == "read"), "{ms:?}");
    // Named after the contact on both devices, whichever came first there:
    // the contact (from the account) or carol's first message.
    let (_, list) = unread(&phone).await;
    assert!(list[0]["name"] == "carol", "{list}");
}
