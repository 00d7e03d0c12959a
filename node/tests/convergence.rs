//! Property: whatever the order, duplication and delay in which a device
//! receives the same envelopes, it ends with the identical history.
//!
//! Real nodes (alice, carol) write a group conversation and a one-to-one
//! one to bob, and edit, delete and react to some of it; bob's envelopes
//! are then taken from his store and fed to fresh copies of bob (same
//! keys, empty store, offline) shuffled, duplicated and split into delayed
//! chunks (so an edit often comes before its message). A deleted message's
//! envelope is erased from bob's store, so the copies never see it: they
//! show no tombstone for it, and everything else the same.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestNode, befriend, group_create};
use proptest::prelude::*;
use serde_json::Value;
use weft_node::api::Request;
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::ids::ConversationId;
use weft_node::store::Store;
use weft_node::{Node, NodeConfig};

const SEED: u64 = 41;

/// One message as compared: id, sender, text, order key, and edited,
/// deleted and reactions (as JSON).
type Line = (String, String, String, u64, String);
/// Every conversation's history, by conversation id.
type Histories = Vec<(String, Vec<Line>)>;

/// What a history is, for comparison.
fn history(ms: &[Value]) -> Vec<Line> {
    ms.iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["sender"].as_str().unwrap().to_string(),
                m["text"].as_str().unwrap().to_string(),
                m["hlc"].as_u64().unwrap(),
                serde_json::json!([m["edited"], m["deleted"], m["reactions"]]).to_string(),
            )
        })
        .collect()
}

struct Recorded {
    envelopes: Vec<Vec<u8>>,
    /// Bob's histories.
    expected: Histories,
    /// Bob's handout keys (public, secret, made at).
    handout_keys: Vec<([u8; 32], [u8; 32], i64)>,
}

/// Runs alice, bob and carol, lets them talk, and returns every envelope
/// bob holds with the histories he shows.
fn record() -> Recorded {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let alice = TestNode::start("alice", SEED, &[]).await;
        // Bob issues no one-time keys: a handout sealed to one opens once,
        // and its key is erased then (forward secrecy), so a second home
        // could not open it again. They are sealed to his handout keys.
        let no_one_time_keys = weft_node::Settings {
            one_time_keys: 0,
            ..weft_node::Settings::default()
        };
        let mut bob = TestNode::start_with("bob", SEED, &[&alice], no_one_time_keys).await;
        let carol = TestNode::start("carol", SEED, &[&alice, &bob]).await;
        befriend(&alice, &bob).await;
        befriend(&alice, &carol).await;
        alice.call(group_create("trio", &["bob", "carol"])).await;
        for i in 0..6 {
            alice.send("trio", &format!("a{i}")).await;
            alice.send("bob", &format!("direct {i}")).await;
        }
        bob.expect_text("trio", "a5").await;
        for i in 0..6 {
            carol.send("trio", &format!("c{i}")).await;
        }
        bob.expect_text("trio", "c5").await;
        bob.expect_text("alice", "direct 5").await;
        // Annotations by alice and carol.
        let ids: Vec<(String, String)> = bob
            .messages("trio")
            .await
            .iter()
            .map(|m| {
                (
                    m["text"].as_str().unwrap().to_string(),
                    m["id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let id = |text: &str| ids.iter().find(|(t, _)| t == text).unwrap().1.clone();
        let edit = |id: String, text: &str| Request::Edit {
            id,
            text: text.into(),
        };
        let react = |id: String, emoji: &str| Request::React {
            id,
            emoji: emoji.into(),
            remove: false,
        };
        alice.call(edit(id("a0"), "a0 edited")).await;
        alice.call(edit(id("a0"), "a0 edited twice")).await;
        alice.call(Request::Delete { id: id("a2") }).await;
        alice.call(react(id("c1"), "🎉")).await;
        carol.call(edit(id("c0"), "c0 edited")).await;
        carol.call(react(id("a1"), "👍")).await;
        bob.wait_messages("trio", "the annotations", |ms| {
            let by = |text: &str| ms.iter().find(|m| m["id"] == id(text)).unwrap();
            by("a0")["text"] == "a0 edited twice"
                && by("a2")["deleted"] == true
                && by("c1")["reactions"]["🎉"].is_array()
                && by("c0")["text"] == "c0 edited"
                && by("a1")["reactions"]["👍"].is_array()
        })
        .await;
        let mut expected = Vec::new();
        for conv in bob.call(Request::Conversations).await.as_array().unwrap() {
            let id = conv["id"].as_str().unwrap().to_string();
            let shown = bob.messages(&id).await;
            let kept: Vec<Value> = shown.into_iter().filter(|m| m["deleted"] != true).collect();
            expected.push((id.clone(), history(&kept)));
        }
        bob.stop().await;
        let store = Store::open(&bob.dir.path().join("home").join("weft.db")).unwrap();
        let db = store.db();
        let mut envelopes = Vec::new();
        for (id, _) in &expected {
            let conv: ConversationId = id.parse().unwrap();
            let mut rowids: Vec<i64> = db
                .sealed_envelope_ids(&conv)
                .unwrap()
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            rowids.extend(db.chain_positions(&conv).unwrap().into_iter().map(|p| p.3));
            envelopes.extend(db.envelope_bytes_by_rowid(&rowids).unwrap());
        }
        // Bob's handout keys: what his key handouts were sealed to.
        let handout_keys = db
            .own_handout_keys()
            .unwrap()
            .iter()
            .map(|k| (k.public, *k.secret, k.created_at_ms))
            .collect();
        Recorded {
            envelopes,
            expected,
            handout_keys,
        }
    })
}

/// A fresh, offline bob fed `chunks` one after another.
async fn replay(
    chunks: Vec<Vec<Vec<u8>>>,
    handout_keys: &[([u8; 32], [u8; 32], i64)],
) -> Histories {
    let dir = tempfile::Builder::new()
        .prefix("weft-bob-replay-")
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    let identity = Identity::from_seed(format!("bob/{SEED}").as_bytes(), 0).unwrap();
    home.init_with(&identity, "Bob").unwrap();
    {
        // The same device as the recorded bob: it holds his handout keys.
        let store = Store::open(&home.db_path()).unwrap();
        for (public, secret, at) in handout_keys {
            store.db().add_own_handout_key(public, secret, *at).unwrap();
        }
    }
    let node = Node::start(NodeConfig::new(dir.path().join("home"), None))
        .await
        .unwrap();
    let handle = node.handle();
    for chunk in chunks {
        handle.deliver(chunk).await.unwrap();
        // A delay: other work may run between chunks.
        tokio::task::yield_now().await;
    }
    let mut out = Vec::new();
    let convs = handle.call(Request::Conversations).await.unwrap().to_json();
    for conv in convs.as_array().unwrap() {
        let id = conv["id"].as_str().unwrap().to_string();
        let ms = handle
            .call(Request::Messages {
                target: id.clone(),
                limit: Some(10_000),
                before: None,
            })
            .await
            .unwrap()
            .to_json();
        out.push((id, history(ms.as_array().unwrap())));
    }
    node.shutdown().await.unwrap();
    out.sort();
    out
}

#[test]
fn any_order_duplication_and_delay_gives_the_same_history() {
    let recorded = record();
    let mut expected = recorded.expected.clone();
    expected.sort();
    let total: usize = expected.iter().map(|(_, h)| h.len()).sum();
    assert_eq!(
        total, 17,
        "the recording holds every message once, but the deleted one"
    );
    let n = recorded.envelopes.len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        order in Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
        dups in proptest::collection::vec(0..n, 0..n),
        cuts in proptest::collection::vec(1usize..8, 1..40),
    )| {
        // Every envelope once, in a random order, plus random duplicates
        // at random places.
        let mut stream: Vec<Vec<u8>> =
            order.iter().map(|i| recorded.envelopes[*i].clone()).collect();
        for (k, d) in dups.iter().enumerate() {
            let at = (k * 7 + d) % (stream.len() + 1);
            stream.insert(at, recorded.envelopes[*d].clone());
        }
        let mut chunks = Vec::new();
        let mut rest = stream.as_slice();
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at((*cut).min(rest.len()));
            chunks.push(head.to_vec());
            rest = tail;
        }
        let got = rt.block_on(replay(chunks, &recorded.handout_keys));
        prop_assert_eq!(got, expected.clone());
    });
}
