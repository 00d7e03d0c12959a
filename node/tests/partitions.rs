//! Convergence under partitions: alice with three devices (laptop, phone,
//! tablet), bob and carol, in a group and two one-to-one conversations.
//!
//! After a real set-up (linking, history, contacts), every node is taken
//! off the network and the test becomes the network: each round it splits
//! the five devices into random groups, every device acts (sends, edits,
//! deletes, reacts; alice's devices also add, remove and block contacts,
//! change presence privacy and mark conversations read), and the devices
//! of each group exchange what they hold, shuffled. After many rounds the
//! partitions heal, and every replica must show the identical
//! materialised history of each conversation it is in (but the tombstones
//! of deleted messages, which a device that missed them never sees), and
//! alice's devices the identical private state. The schedule (partitions, actions,
//! delivery order) is seeded and a failure names its seed; keys and clocks
//! are the nodes' own, so a run is not replayed bit for bit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::{TestNode, link};
use serde_json::Value;
use weft_node::api::Request;
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::store::Store;

/// The devices, by index: alice's three, then bob and carol.
const ALICE: [usize; 3] = [0, 1, 2];
const BOB: usize = 3;
const CAROL: usize = 4;

/// A small seeded generator (xorshift64*): the same seed, the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Users alice's devices befriend, block and drop during the run. They
/// never run a node: only their invites are needed.
fn passive_invite(name: &str) -> String {
    let id = Identity::from_seed(format!("{name}/passive").as_bytes(), 0).unwrap();
    id.invite(name, vec![id.certificate().clone()], Vec::new(), 0)
        .unwrap()
}

/// Every envelope a device holds, in the conversations `known` (a device
/// only hears the topics it is subscribed to).
fn held(node: &TestNode, known: &HashSet<Vec<u8>>) -> Vec<Vec<u8>> {
    let store = Store::open(&Home::new(node.dir.path().join("home")).db_path()).unwrap();
    let db = store.db();
    let mut out = Vec::new();
    for conv in db.conversations().unwrap() {
        if !known.contains(&conv.id.0.to_vec()) {
            continue;
        }
        let mut rowids: Vec<i64> = db
            .sealed_envelope_ids(&conv.id)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        rowids.extend(
            db.chain_positions(&conv.id)
                .unwrap()
                .into_iter()
                .map(|p| p.3),
        );
        out.extend(db.envelope_bytes_by_rowid(&rowids).unwrap());
    }
    out
}

/// The conversations a device knows (by id bytes).
fn conversations(node: &TestNode) -> HashSet<Vec<u8>> {
    let store = Store::open(&Home::new(node.dir.path().join("home")).db_path()).unwrap();
    store
        .db()
        .conversations()
        .unwrap()
        .into_iter()
        .map(|c| c.id.0.to_vec())
        .collect()
}

/// The network, as the test runs it.
struct Mesh {
    nodes: Vec<TestNode>,
    /// What each device was handed already (by BLAKE3 of the bytes).
    given: Vec<HashSet<[u8; 32]>>,
}

impl Mesh {
    /// Lets the devices of `group` exchange what they hold; returns how
    /// many envelopes were handed over.
    async fn exchange(&mut self, group: &[usize], rng: &mut Rng) -> usize {
        let mut moved = 0;
        for &dst in group {
            let known = conversations(&self.nodes[dst]);
            let mut batch = Vec::new();
            for &src in group {
                if src == dst {
                    continue;
                }
                for bytes in held(&self.nodes[src], &known) {
                    let hash = *blake3::hash(&bytes).as_bytes();
                    if self.given[dst].insert(hash) {
                        batch.push(bytes);
                    }
                }
            }
            moved += batch.len();
            rng.shuffle(&mut batch);
            // In a few deliveries, so that work runs in between.
            for chunk in batch.chunks(7) {
                self.nodes[dst]
                    .handle
                    .deliver(chunk.to_vec())
                    .await
                    .unwrap();
            }
        }
        moved
    }
}

/// What a message is, for comparison: id, sender, text, order key, and
/// edited, deleted and reactions.
fn line(m: &Value) -> String {
    serde_json::json!([
        m["id"],
        m["sender"],
        m["text"],
        m["hlc"],
        m["edited"],
        m["deleted"],
        m["reactions"]
    ])
    .to_string()
}

/// The materialised history of every conversation a device shows, by
/// conversation id (incoming messages with whether they are read, for
/// alice's devices).
async fn histories(node: &TestNode, with_read: bool) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let convs = node.call(Request::Conversations).await;
    for c in convs.as_array().unwrap() {
        let id = c["id"].as_str().unwrap().to_string();
        // A deleted message's envelope is erased everywhere, so a device
        // that missed it never learns of it: tombstones are not compared.
        let lines = node
            .messages(&id)
            .await
            .iter()
            .filter(|m| m["deleted"] != true)
            .map(|m| {
                let read = with_read && m["outgoing"] == false && m["status"] == "read";
                format!("{}{}", line(m), if read { " read" } else { "" })
            })
            .collect();
        out.insert(id, lines);
    }
    out
}

/// Alice's private state as a device shows it.
async fn private_state(node: &TestNode) -> Value {
    let mut contacts: Vec<Value> = node
        .call(Request::ContactList)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::json!([c["user_id"], c["alias"], c["blocked"]]))
        .collect();
    contacts.sort_by_key(|c| c.to_string());
    let privacy = node.call(Request::Privacy { presence: None }).await;
    serde_json::json!({ "contacts": contacts, "privacy": privacy["presence"] })
}

/// One device's turn: one or two random actions.
async fn act(mesh: &Mesh, who: usize, round: usize, rng: &mut Rng, invites: &[(String, String)]) {
    let node = &mesh.nodes[who];
    let targets: &[&str] = match who {
        BOB | CAROL => &["alice", "trio"],
        _ => &["bob", "carol", "trio"],
    };
    for k in 0..1 + rng.below(2) {
        let target = *rng.pick(targets);
        let roll = rng.below(100);
        let req = if roll < 40 {
            Request::Send {
                target: target.into(),
                text: format!("{} r{round} #{k}", node.name),
                reply_to: None,
            }
        } else if roll < 75 {
            // Edit, delete or react to something shown.
            let ms = node.messages(target).await;
            let live: Vec<&Value> = ms.iter().filter(|m| m["deleted"] == false).collect();
            if live.is_empty() {
                continue;
            }
            let m = *rng.pick(&live);
            let id = m["id"].as_str().unwrap().to_string();
            let mine = m["outgoing"] == true;
            if mine && roll < 55 {
                Request::Edit {
                    id,
                    text: format!("edited by {} r{round}", node.name),
                }
            } else if mine && roll < 60 {
                Request::Delete { id }
            } else {
                Request::React {
                    id,
                    emoji: rng.pick(&["👍", "🎉", "😂"]).to_string(),
                    remove: rng.chance(30),
                }
            }
        } else if ALICE.contains(&who) {
            // Alice's private state.
            let (name, invite) = rng.pick(invites);
            let list = node.call(Request::ContactList).await;
            let known = list
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["alias"] == name.as_str());
            match rng.below(5) {
                0 | 1 if !known => Request::ContactAdd {
                    invite: invite.clone(),
                    name: Some(name.clone()),
                },
                0 => Request::ContactRemove {
                    alias: name.clone(),
                },
                1 | 2 if known => {
                    if rng.chance(50) {
                        Request::ContactBlock {
                            alias: name.clone(),
                        }
                    } else {
                        Request::ContactUnblock {
                            alias: name.clone(),
                        }
                    }
                }
                3 => Request::Privacy {
                    presence: Some(rng.pick(&["everyone", "contacts", "nobody"]).to_string()),
                },
                _ => Request::Read {
                    target: target.into(),
                },
            }
        } else {
            Request::Read {
                target: target.into(),
            }
        };
        // Some actions are refused (an edit of a message deleted in the
        // meantime, a contact added twice): that is part of the run.
        let _ = node.handle.call(req).await;
    }
}

async fn run(seed: u64, rounds: usize) {
    // A real set-up: contacts, a group, two more devices with history.
    let (alice, bob, carol) = common::trio(seed).await;
    alice.send("trio", "hello, trio").await;
    let phone = link(&alice, "alice-phone", &[&alice, &bob, &carol]).await;
    let tablet = link(&alice, "alice-tablet", &[&alice, &bob, &carol, &phone]).await;
    for device in [&phone, &tablet] {
        device.expect_text("trio", "hello, trio").await;
    }
    for (node, alias) in [
        (&bob, "alice"),
        (&carol, "alice"),
        (&phone, "bob"),
        (&tablet, "carol"),
    ] {
        let what = format!("{}: {alias}'s devices never all known", node.name);
        common::poll_until(&what, || async {
            let list = node.call(Request::ContactList).await;
            let devices = list
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["alias"] == alias)
                .and_then(|c| c["devices"].as_u64());
            (devices == Some(if alias == "alice" { 3 } else { 1 })).then_some(())
        })
        .await;
    }

    // Off the network: from here on the test carries every envelope.
    let mut nodes = Vec::new();
    for mut node in [alice, phone, tablet, bob, carol] {
        node.stop().await;
        nodes.push(TestNode::start_offline(&node.name.clone(), node.dir).await);
    }
    let mut mesh = Mesh {
        given: vec![HashSet::new(); nodes.len()],
        nodes,
    };
    let invites: Vec<(String, String)> = ["dave", "erin"]
        .iter()
        .map(|n| (n.to_string(), passive_invite(n)))
        .collect();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let all: Vec<usize> = (0..mesh.nodes.len()).collect();
    for round in 0..rounds {
        // A random partition into one to three groups.
        let parts = 1 + rng.below(3);
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for &n in &all {
            groups.entry(rng.below(parts)).or_default().push(n);
        }
        let mut order = all.clone();
        rng.shuffle(&mut order);
        for &who in &order {
            act(&mesh, who, round, &mut rng, &invites).await;
        }
        let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
        groups.sort();
        for group in groups {
            mesh.exchange(&group, &mut rng).await;
        }
    }

    // Healed: exchange until nothing new moves (receipts and keys handed
    // on make more to carry for a few passes).
    let mut passes = 0;
    while mesh.exchange(&all, &mut rng).await > 0 {
        passes += 1;
        assert!(
            passes < 20,
            "seed {seed}: still moving after {passes} passes"
        );
    }

    let mut by_conv: BTreeMap<String, Vec<(String, Vec<String>)>> = BTreeMap::new();
    for (i, node) in mesh.nodes.iter().enumerate() {
        for (conv, lines) in histories(node, ALICE.contains(&i)).await {
            by_conv
                .entry(conv)
                .or_default()
                .push((node.name.clone(), lines));
        }
    }
    // Conversations with dave and erin (who never write) stay empty.
    by_conv.retain(|_, replicas| replicas.iter().any(|(_, lines)| !lines.is_empty()));
    let shape: Vec<(String, Vec<(String, usize)>)> = by_conv
        .iter()
        .map(|(c, r)| {
            (
                c.clone(),
                r.iter().map(|(n, l)| (n.clone(), l.len())).collect(),
            )
        })
        .collect();
    assert_eq!(
        by_conv.len(),
        3,
        "seed {seed}: the group and two direct conversations: {shape:?}"
    );
    let mut total = 0;
    for (conv, replicas) in &by_conv {
        // Bob and carol do not compare alice's read marks.
        let strip = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .map(|l| l.trim_end_matches(" read").to_string())
                .collect()
        };
        let first = &replicas[0];
        total += first.1.len();
        for other in &replicas[1..] {
            let same = if other.0.starts_with("alice") && first.0.starts_with("alice") {
                other.1 == first.1
            } else {
                strip(&other.1) == strip(&first.1)
            };
            assert!(
                same,
                "seed {seed}, conversation {conv}: {} and {} differ\n{:#?}\n{:#?}",
                first.0, other.0, first.1, other.1
            );
        }
    }
    let mut spread: Vec<usize> = by_conv.values().map(Vec::len).collect();
    spread.sort_unstable();
    assert_eq!(
        spread,
        vec![4, 4, 5],
        "seed {seed}: each direct conversation on alice's three devices and one more, the group on all"
    );
    assert!(
        total > rounds,
        "seed {seed}: only {total} messages in {rounds} rounds"
    );
    let all_lines: Vec<&String> = by_conv.values().flat_map(|r| r[0].1.iter()).collect();
    eprintln!(
        "seed {seed}: {} messages, {} edited, {} deleted, {} with reactions, {} read on alice",
        all_lines.len(),
        all_lines
            .iter()
            .filter(|l| l.contains(",true,false,"))
            .count(),
        all_lines
            .iter()
            .filter(|l| l.contains(",true,{") || l.contains(",false,true,"))
            .count(),
        all_lines.iter().filter(|l| !l.contains("{}")).count(),
        all_lines.iter().filter(|l| l.ends_with(" read")).count(),
    );
    let mut states = Vec::new();
    for i in ALICE {
        states.push(private_state(&mesh.nodes[i]).await);
    }
    for s in &states[1..] {
        assert_eq!(
            s, &states[0],
            "seed {seed}: alice's devices disagree on her private state"
        );
    }
    for node in &mut mesh.nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_bob_and_carol_converge_after_random_partitions() {
    for seed in [61, 62, 63] {
        run(seed, 30).await;
    }
}
