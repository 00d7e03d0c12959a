//! Reliable delivery across nodes in one process: a partition and its
//! healing, catch-up from a third party, receipts, presence and typing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{TestNode, befriend, group_create, next_event_matching, poll_until};
use serde_json::Value;
use weft_node::Settings;
use weft_node::api::{Event, Request};

fn ids(ms: &[Value]) -> Vec<String> {
    ms.iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn count_prefixed(ms: &[Value], prefix: &str) -> usize {
    ms.iter()
        .filter(|m| m["text"].as_str().unwrap().starts_with(prefix))
        .count()
}

/// Waits until every message of `target` whose text starts with `prefix`
/// has `status`.
async fn wait_status(node: &TestNode, target: &str, prefix: &str, n: usize, status: &str) {
    node.wait_messages(target, &format!("{n} {prefix}* {status}"), |ms| {
        let mine: Vec<&Value> = ms
            .iter()
            .filter(|m| m["text"].as_str().unwrap().starts_with(prefix))
            .collect();
        mine.len() == n && mine.iter().all(|m| m["status"] == status)
    })
    .await;
}

async fn wait_group(node: &TestNode, group: &str) {
    poll_until(&format!("{} never joined {group}", node.name), || async {
        let groups = node.call(Request::GroupList).await;
        groups
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == group)
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_heals_with_every_message_once_in_order_and_receipts() {
    let (alice, mut bob, carol) = common::trio(31).await;
    wait_group(&bob, "trio").await;
    wait_group(&carol, "trio").await;
    alice.send("trio", "before").await;
    bob.expect_text("trio", "before").await;

    // Bob goes away; once alice has noticed, she writes 50 to him and 50
    // to the group.
    let mut statuses = alice.handle.events();
    let bob_peer = bob.handle.peer_id().to_string();
    bob.stop().await;
    next_event_matching(
        &mut statuses,
        "alice to see bob go",
        |e| matches!(e, Event::Peer { peer_id, connected: false } if *peer_id == bob_peer),
    )
    .await;
    let mut direct_ids = HashSet::new();
    for i in 0..50 {
        let sent = alice.send("bob", &format!("p2p-{i}")).await;
        direct_ids.insert(sent["id"].as_str().unwrap().to_string());
        alice.send("trio", &format!("grp-{i}")).await;
    }
    // Carol has the group's; the direct ones wait for bob.
    carol
        .wait_messages("trio", "50 group messages", |ms| {
            count_prefixed(ms, "grp-") == 50
        })
        .await;
    let queued = alice.messages("bob").await;
    assert!(
        queued
            .iter()
            .filter(|m| m["text"].as_str().unwrap().starts_with("p2p-"))
            .all(|m| m["status"] == "queued"),
        "with bob away, nobody has the direct messages"
    );

    // Bob returns (on a new address; he dials alice and carol).
    let dir = bob.dir;
    let bob = TestNode::start_existing("bob", dir, &[&alice, &carol]).await;
    let direct = bob
        .wait_messages("alice", "50 direct messages", |ms| {
            count_prefixed(ms, "p2p-") == 50
        })
        .await;
    let group = bob
        .wait_messages("trio", "50 group messages", |ms| {
            count_prefixed(ms, "grp-") == 50
        })
        .await;
    // Exactly once: no id twice, no text twice.
    for ms in [&direct, &group] {
        let unique: HashSet<String> = ids(ms).into_iter().collect();
        assert_eq!(unique.len(), ms.len(), "a message is stored twice");
        let texts: HashSet<&str> = ms.iter().map(|m| m["text"].as_str().unwrap()).collect();
        assert_eq!(texts.len(), ms.len(), "a text arrived twice");
    }
    // The same order on every node, and alice's own order kept.
    let alice_group = alice.messages("trio").await;
    let carol_group = carol.messages("trio").await;
    assert_eq!(ids(&group), ids(&alice_group));
    assert_eq!(ids(&group), ids(&carol_group));
    let alice_direct = alice.messages("bob").await;
    assert_eq!(ids(&direct), ids(&alice_direct));
    let texts: Vec<&str> = direct.iter().map(|m| m["text"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("p2p-{i}")).collect();
    assert_eq!(texts, expected);

    // Alice sees them delivered, then read once bob reads.
    wait_status(&alice, "bob", "p2p-", 50, "delivered").await;
    wait_status(&alice, "trio", "grp-", 50, "delivered").await;
    bob.call(Request::Read {
        target: "alice".into(),
    })
    .await;
    wait_status(&alice, "bob", "p2p-", 50, "read").await;
    // In the group, read means read by everyone.
    bob.call(Request::Read {
        target: "trio".into(),
    })
    .await;
    let half = alice.messages("trio").await;
    let grp = half
        .iter()
        .find(|m| m["text"] == "grp-7")
        .expect("grp-7 is there");
    assert_eq!(grp["progress"]["recipients"], 2);
    carol
        .call(Request::Read {
            target: "trio".into(),
        })
        .await;
    wait_status(&alice, "trio", "grp-", 50, "read").await;
    let done = alice.messages("trio").await;
    let grp = done.iter().find(|m| m["text"] == "grp-7").unwrap();
    assert_eq!(grp["progress"]["read"], 2);
    let receipts = grp["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 2);
    assert!(
        receipts.iter().all(|r| r["status"] == "read"),
        "{receipts:?}"
    );

    // Each direct message went queued -> (sent) -> delivered -> read, as
    // `watch` saw it: never backwards.
    let rank = |s: &str| match s {
        "queued" => 0,
        "sent" => 1,
        "relayed" => 2,
        "delivered" => 3,
        "read" => 4,
        _ => panic!("unknown status {s}"),
    };
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    while let Ok(ev) = statuses.try_recv() {
        if let Event::Status { id, status, .. } = ev
            && direct_ids.contains(&id)
        {
            seen.entry(id).or_default().push(status);
        }
    }
    assert_eq!(seen.len(), 50, "every direct message had status events");
    for (id, list) in &seen {
        let ranks: Vec<i32> = list.iter().map(|s| rank(s)).collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{id}: {list:?}");
        assert!(list.contains(&"delivered".to_string()), "{id}: {list:?}");
        assert_eq!(
            list.last().map(String::as_str),
            Some("read"),
            "{id}: {list:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_from_a_third_party() {
    let (alice, mut bob, carol) = common::trio(32).await;
    wait_group(&bob, "trio").await;
    wait_group(&carol, "trio").await;

    // Bob away; alice's first messages of this group (her key goes out
    // with them) reach carol only; then alice goes away too.
    bob.stop().await;
    for i in 0..20 {
        alice.send("trio", &format!("while-away-{i}")).await;
    }
    carol
        .wait_messages("trio", "alice's 20", |ms| {
            count_prefixed(ms, "while-away-") == 20
        })
        .await;
    let mut alice = alice;
    alice.stop().await;

    // Bob comes back knowing only carol's address.
    let bob = TestNode::start_existing("bob", bob.dir, &[&carol]).await;
    let got = bob
        .wait_messages("trio", "alice's 20 from carol", |ms| {
            count_prefixed(ms, "while-away-") == 20
        })
        .await;
    assert_eq!(ids(&got), ids(&carol.messages("trio").await));
    let texts: Vec<&str> = got.iter().map(|m| m["text"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("while-away-{i}")).collect();
    assert_eq!(texts, expected);
}

fn quick_presence() -> Settings {
    Settings {
        heartbeat: Duration::from_secs(1),
        typing_ttl: Duration::from_millis(600),
        ..Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_appear_expire_and_obey_privacy() {
    let alice = TestNode::start_with("alice", 33, &[], quick_presence()).await;
    let bob = TestNode::start_with("bob", 33, &[&alice], quick_presence()).await;
    let mut bob_events = bob.handle.events();
    befriend(&alice, &bob).await;

    // Contacts share presence by default: bob sees alice come online.
    next_event_matching(
        &mut bob_events,
        "alice online",
        |e| matches!(e, Event::Presence { online: true, name, .. } if name == "alice"),
    )
    .await;
    let p = bob
        .call(Request::Presence {
            target: "alice".into(),
        })
        .await;
    assert_eq!(p["online"], true);
    assert!(p["last_seen"].as_i64().unwrap() > 0);

    // Typing appears, and stops by itself.
    alice
        .call(Request::Typing {
            target: "bob".into(),
            typing: true,
        })
        .await;
    next_event_matching(
        &mut bob_events,
        "alice typing",
        |e| matches!(e, Event::Typing { typing: true, name, .. } if name == "alice"),
    )
    .await;
    let started = tokio::time::Instant::now();
    next_event_matching(
        &mut bob_events,
        "alice's typing to expire",
        |e| matches!(e, Event::Typing { typing: false, name, .. } if name == "alice"),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Alice hides: her heartbeats stop, bob sees her go offline (with a
    // last-seen time), and her typing no longer reaches him.
    let privacy = alice
        .call(Request::Privacy {
            presence: Some("nobody".into()),
        })
        .await;
    assert_eq!(privacy["presence"], "nobody");
    next_event_matching(
        &mut bob_events,
        "alice offline",
        |e| matches!(e, Event::Presence { online: false, name, .. } if name == "alice"),
    )
    .await;
    let p = bob
        .call(Request::Presence {
            target: "alice".into(),
        })
        .await;
    assert_eq!(p["online"], false);
    assert!(p["last_seen"].as_i64().is_some());
    let told = alice
        .call(Request::Typing {
            target: "bob".into(),
            typing: true,
        })
        .await;
    assert_eq!(told["told"], 0);
    // Still connected and hearing each other: a message gets through, and
    // no typing or presence event came with it.
    alice.send("bob", "quietly").await;
    bob.expect_text("alice", "quietly").await;
    while let Ok(ev) = bob_events.try_recv() {
        assert!(
            !matches!(
                ev,
                Event::Typing { .. } | Event::Presence { online: true, .. }
            ),
            "{ev:?}"
        );
    }
    // A bad setting is the caller's error.
    let err = alice
        .handle
        .call(Request::Privacy {
            presence: Some("friends".into()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_above_the_limit_send_no_read_receipts() {
    let small = Settings {
        read_receipts_max_group: 2,
        ..Settings::default()
    };
    let alice = TestNode::start_with("alice", 34, &[], small.clone()).await;
    let bob = TestNode::start_with("bob", 34, &[&alice], small.clone()).await;
    let carol = TestNode::start_with("carol", 34, &[&alice, &bob], small).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    alice.call(group_create("trio", &["bob", "carol"])).await;
    wait_group(&bob, "trio").await;
    wait_group(&carol, "trio").await;
    alice.send("trio", "big group").await;
    alice.send("bob", "small talk").await;
    wait_status(&alice, "trio", "big group", 1, "delivered").await;
    for n in [&bob, &carol] {
        let r = n
            .call(Request::Read {
                target: "trio".into(),
            })
            .await;
        assert_eq!(r["read"], 1);
        assert_eq!(r["receipts_sent"], false);
    }
    // A direct conversation still gets its read receipt; once alice has
    // it, anything bob and carol would have sent for the group is there too.
    bob.expect_text("alice", "small talk").await;
    bob.call(Request::Read {
        target: "alice".into(),
    })
    .await;
    wait_status(&alice, "bob", "small talk", 1, "read").await;
    let ms = alice.messages("trio").await;
    assert_eq!(ms[0]["status"], "delivered");
    assert_eq!(ms[0]["progress"]["read"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absence_is_caught_up_past_the_skip_window() {
    // More messages than a receiver may skip ahead (2,000): bob must take
    // the backlog in order, and a new message that overtakes it must wait
    // for it rather than be refused.
    let alice = TestNode::start("alice", 35, &[]).await;
    let mut bob = TestNode::start("bob", 35, &[&alice]).await;
    befriend(&alice, &bob).await;
    alice.send("bob", "hello").await;
    bob.expect_text("alice", "hello").await;
    let mut events = alice.handle.events();
    let bob_peer = bob.handle.peer_id().to_string();
    bob.stop().await;
    next_event_matching(
        &mut events,
        "alice to see bob go",
        |e| matches!(e, Event::Peer { peer_id, connected: false } if *peer_id == bob_peer),
    )
    .await;
    let n = 2_100;
    let mut pending = Vec::new();
    for i in 0..n {
        let handle = alice.handle.clone();
        pending.push(tokio::spawn(async move {
            handle
                .call(Request::Send {
                    target: "bob".into(),
                    text: format!("backlog-{i}"),
                    reply_to: None,
                })
                .await
                .unwrap()
        }));
        if pending.len() == 256 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let back = tokio::time::Instant::now();
    let bob = TestNode::start_existing("bob", bob.dir, &[&alice]).await;
    next_event_matching(
        &mut events,
        "bob back",
        |e| matches!(e, Event::Peer { peer_id, connected: true } if *peer_id == bob_peer),
    )
    .await;
    alice.send("bob", "overtaking").await;
    let got = bob
        .wait_messages("alice", "the backlog and the new one", |ms| {
            count_prefixed(ms, "backlog-") == n && ms.iter().any(|m| m["text"] == "overtaking")
        })
        .await;
    eprintln!("bob caught up {n} in {:?}", back.elapsed());
    let unique: HashSet<String> = ids(&got).into_iter().collect();
    assert_eq!(unique.len(), got.len());
    assert_eq!(got.len(), n + 2);
    assert_eq!(ids(&got), ids(&alice.messages("bob").await));
}

/// Waits until `node` holds chain-sealed envelopes beyond `known`; returns
/// them.
async fn new_chain_envelopes(node: &TestNode, known: &HashSet<Vec<u8>>) -> Vec<Vec<u8>> {
    poll_until(
        &format!("{} never sealed anything new", node.name),
        || async {
            let new: Vec<Vec<u8>> = node
                .chain_envelopes(|_| true)
                .into_iter()
                .filter(|e| !known.contains(e))
                .collect();
            (!new.is_empty()).then_some(new)
        },
    )
    .await
}

/// alice and bob, contacts with one message delivered (so each holds the
/// other's chain), restarted off the network: the test carries envelopes.
async fn acquainted_offline(seed: u64, bob_settings: Settings) -> (TestNode, TestNode) {
    let mut alice = TestNode::start("alice", seed, &[]).await;
    let mut bob = TestNode::start("bob", seed + 1, &[&alice]).await;
    befriend(&alice, &bob).await;
    alice.send("bob", "hello").await;
    bob.expect_text("alice", "hello").await;
    wait_status(&alice, "bob", "hello", 1, "delivered").await;
    alice.stop().await;
    bob.stop().await;
    (
        TestNode::start_offline("alice", alice.dir).await,
        TestNode::start_offline_with("bob", bob.dir, bob_settings).await,
    )
}

/// Delivered receipts wait a moment to travel together, so one that is
/// lost must not leave the sender's message at "sent" for good: when the
/// sender offers the message again, the receiver acknowledges it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_receipt_is_sent_again_when_the_message_is_offered_again() {
    // The test carries the envelopes, and loses one.
    let (alice, bob) = acquainted_offline(91, Settings::default()).await;
    let sent = alice.send("bob", "second").await;
    let message = alice.envelope_bytes(sent["id"].as_str().unwrap());

    let mut known = bob.chain_envelopes(|_| true);
    known.insert(message.clone());
    assert_eq!(bob.handle.deliver(vec![message.clone()]).await.unwrap(), 1);
    bob.expect_text("alice", "second").await;
    let lost = new_chain_envelopes(&bob, &known).await;
    assert_eq!(lost.len(), 1, "one receipt for one message");
    known.extend(lost);

    // Alice's retry: the same envelope, offered directly.
    bob.handle.deliver(vec![message]).await.unwrap();
    let again = new_chain_envelopes(&bob, &known).await;
    assert_eq!(again.len(), 1);
    assert_eq!(alice.handle.deliver(again).await.unwrap(), 1);
    wait_status(&alice, "bob", "second", 1, "delivered").await;
}

/// After a quiet spell a message is acknowledged at once; messages stored
/// within the delay of that receipt, in separate batches, wait and are
/// acknowledged together; a node that stops sends the receipts still
/// waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_for_a_burst_travel_together_and_leave_at_shutdown() {
    let waits_long = Settings {
        receipt_delay: Duration::from_secs(3600),
        ..Settings::default()
    };
    let (alice, mut bob) = acquainted_offline(93, waits_long).await;
    let mut known = bob.chain_envelopes(|_| true);
    let mut receipts = Vec::new();
    for i in 0..5 {
        let sent = alice.send("bob", &format!("burst {i}")).await;
        let message = alice.envelope_bytes(sent["id"].as_str().unwrap());
        known.insert(message.clone());
        // One delivery, one batch, each.
        assert_eq!(bob.handle.deliver(vec![message]).await.unwrap(), 1);
        if i == 0 {
            let first = new_chain_envelopes(&bob, &known).await;
            assert_eq!(first.len(), 1, "the first is acknowledged at once");
            known.extend(first.iter().cloned());
            receipts.extend(first);
        }
    }
    bob.expect_text("alice", "burst 4").await;
    assert!(
        bob.chain_envelopes(|_| true).is_subset(&known),
        "the others wait for the delay"
    );

    bob.stop().await;
    let rest: Vec<Vec<u8>> = bob
        .chain_envelopes(|_| true)
        .into_iter()
        .filter(|e| !known.contains(e))
        .collect();
    assert_eq!(rest.len(), 1, "one receipt for the other four, at shutdown");
    receipts.extend(rest);
    assert_eq!(alice.handle.deliver(receipts).await.unwrap(), 2);
    wait_status(&alice, "bob", "burst", 5, "delivered").await;
}

/// Every queued envelope is tracked again after a restart, however many:
/// the retry tick drops a due entry it does not track (everyone has it),
/// so one that startup left out was lost. Startup used to read at most
/// 100,000; here the one past that is the only one due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queued_envelope_survives_a_restart_past_100_000() {
    const QUEUED: i64 = 100_001;
    let mut alice = TestNode::start("alice", 36, &[]).await;
    // The account's own conversation: every device has it.
    let me = alice.identity().user_id();
    let own = weft_node::ids::ConversationId::direct(&me, &me);
    alice.stop().await;

    let db_path = weft_node::home::Home::new(alice.dir.path().join("home")).db_path();
    let now = weft_node::node::now_ms();
    {
        let mut store = weft_node::store::Store::open(&db_path).unwrap();
        let txn = store.transaction().unwrap();
        for i in 0..QUEUED {
            let last = i == QUEUED - 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.to_be_bytes());
            txn.db()
                .enqueue_outbox(&weft_node::store::OutboxEntry {
                    envelope_id: weft_node::ids::EnvelopeId(id),
                    conversation: own,
                    bytes: vec![0; 64],
                    // The last one queued is the newest, and the only one due.
                    created_at_ms: now - QUEUED + i,
                    attempts: 0,
                    next_attempt_at_ms: if last { 0 } else { now + 3_600_000 },
                    expires_at_ms: now + 7 * 24 * 3_600_000,
                })
                .unwrap();
        }
        txn.commit().unwrap();
    }

    let alice = TestNode::start_offline("alice", alice.dir).await;
    // Wait for a retry tick to have taken the due entry (tried it, or, as
    // before, dropped it).
    poll_until("a retry tick", || async {
        let store = weft_node::store::Store::open(&db_path).unwrap();
        let due = store.db().outbox_due(weft_node::node::now_ms(), 1).unwrap();
        due.is_empty().then_some(())
    })
    .await;
    let status = alice.call(Request::Status).await;
    assert_eq!(
        status["outbox"], QUEUED,
        "every queued envelope is still queued"
    );
}
