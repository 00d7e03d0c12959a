//! Attack (issue 13, hole 4): forward secrecy inside a chain, against a
//! copy of a device's home taken while it is stopped.
//!
//! The attacker recorded alice's envelopes on the wire and later copies
//! bob's home (the database and its `-wal`, if any). Bob had received
//! every one of those envelopes, out of order (so he held skipped keys,
//! used since), and one message was deleted before the copy. From the
//! copy, no key may open any recorded envelope, and the deleted message
//! may be found neither as text nor as its envelope. Nor may any key in
//! the copy open alice's key handout as recorded on the wire: that would
//! give the chain from its start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::{TestNode, befriend, opening_secrets_in, poll_until};
use weft_node::Settings;
use weft_node::api::Request;
use weft_node::crypto::chain::{MAX_SKIP, MessageKey, ReceivingChain, SendingChain};
use weft_node::crypto::envelope::{Envelope, Sealing, seal_chain, seal_to_devices};
use weft_node::identity::Identity;
use weft_node::payload::{Annotate, Payload, SenderKey};
use weft_node::store::ConversationKind;
use x25519_dalek::StaticSecret;

/// How many messages alice sends after the first, and the order bob
/// receives them in (1-based).
const SENT: usize = 6;
const ARRIVAL: [usize; SENT] = [1, 4, 2, 6, 3, 5];
/// The message alice deletes: it arrived after its key was skipped.
const DELETED: usize = 3;

/// Every regular file under `dir`, with its path relative to `dir`.
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.is_file() {
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                out.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// Copies the files of `from` into `to` (the attacker's copy).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else if path.is_file() {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_home_opens_no_received_envelope_and_holds_no_deleted_message() {
    // alice and bob, contacts, one message delivered (bob holds alice's
    // chain), then off the network: the test carries the envelopes.
    let mut alice = TestNode::start("alice", 141, &[]).await;
    let mut bob = TestNode::start("bob", 142, &[&alice]).await;
    befriend(&alice, &bob).await;
    let bob_device = Identity::from_seed(b"bob/142", 0).unwrap().device_id();
    let alice_device = Identity::from_seed(b"alice/141", 0).unwrap().device_id();
    // alice writes once she holds bob's keys for handouts (what any
    // conversation whose members have been online together reaches).
    poll_until("alice never got bob's one-time keys", || async {
        (alice.one_time_keys_of(&bob_device) > 0).then_some(())
    })
    .await;
    // The truth, to compare with: every key bob could open a handout with
    // now (the attacker does not have these).
    let truth_secrets = opening_secrets_in(&bob.dir.path().join("home"));
    let hello = alice.send("bob", "hello").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    bob.expect_text("alice", "hello").await;
    let hello = bob.envelope_bytes(&hello);
    alice.stop().await;
    bob.stop().await;
    let alice = TestNode::start_offline("alice", alice.dir).await;
    let bob = TestNode::start_offline("bob", bob.dir).await;

    // alice sends 1..=SENT; the attacker records each envelope.
    let mut sent: Vec<(String, String, Vec<u8>)> = Vec::new();
    for i in 1..=SENT {
        let text = format!("fs-secret-{i}: the vault code is {}", 7_301 + i);
        let id = alice.send("bob", &text).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let bytes = alice.envelope_bytes(&id);
        sent.push((text, id, bytes));
    }
    // Bob receives all of them, out of order: keys are skipped and used.
    for i in ARRIVAL {
        let (text, _, bytes) = &sent[i - 1];
        assert_eq!(bob.handle.deliver(vec![bytes.clone()]).await.unwrap(), 1);
        bob.expect_text("alice", text).await;
    }

    // alice deletes one of them; her change reaches bob.
    let (deleted_text, deleted_id, deleted_bytes) = sent[DELETED - 1].clone();
    let before = alice.chain_envelopes(|_| true);
    alice
        .call(Request::Delete {
            id: deleted_id.clone(),
        })
        .await;
    let change: Vec<Vec<u8>> = alice
        .chain_envelopes(|_| true)
        .into_iter()
        .filter(|e| !before.contains(e))
        .collect();
    assert_eq!(change.len(), 1, "one envelope carries the deletion");
    assert_eq!(bob.handle.deliver(change.clone()).await.unwrap(), 1);
    bob.wait_messages("alice", "the deletion", |ms| {
        ms.iter()
            .any(|m| m["id"] == deleted_id.as_str() && m["deleted"] == true)
    })
    .await;

    // Bob stops; the attacker copies his home.
    let mut bob = bob;
    bob.stop().await;
    let copy = tempfile::Builder::new()
        .prefix("weft-bob-copy-")
        .tempdir()
        .unwrap();
    copy_dir(&bob.dir.path().join("home"), copy.path());
    // Made private, as the node insists, so it reads the keys file.
    std::fs::set_permissions(
        copy.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let files = files_under(copy.path());
    let mut broken: Vec<String> = Vec::new();

    // Everything alice sent bob in this chain, as recorded on the wire.
    let mut recorded: Vec<(String, Envelope)> =
        vec![("hello".into(), Envelope::decode(&hello).unwrap())];
    for (i, (_, _, bytes)) in sent.iter().enumerate() {
        recorded.push((
            format!("message {}", i + 1),
            Envelope::decode(bytes).unwrap(),
        ));
    }
    recorded.push(("the deletion".into(), Envelope::decode(&change[0]).unwrap()));

    // The truth: alice's chain from its start, through her key handout to
    // bob as recorded on the wire (opened with the keys bob held before it
    // came). The message key of each recorded counter, and every chain key
    // up to the highest one (each derives the keys of every later counter).
    let mut handouts: Vec<(Envelope, [u8; 32])> = Vec::new();
    let handout = bob
        .sealed_envelopes(|c| c.kind == ConversationKind::Direct)
        .into_iter()
        .filter_map(|bytes| {
            let env = Envelope::decode(&bytes).ok()?;
            let (secret, plain) = truth_secrets.iter().find_map(|(_, secret)| {
                let key = StaticSecret::from(*secret);
                let (_, plain) = env.open_sealed(&bob_device, &key).ok()?;
                Some((*secret, plain))
            })?;
            match Payload::decode(&plain)? {
                Payload::SenderKey(sk) if sk.sender_cert.device == alice_device => {
                    handouts.push((env, secret));
                    Some(sk)
                }
                _ => None,
            }
        })
        .next()
        .expect("bob holds alice's key handout");
    let counter_of = |env: &Envelope| match env.header.sealing {
        Sealing::Chain { counter, .. } => counter,
        Sealing::Sealed { .. } => panic!("a recorded envelope is not chain-sealed"),
    };
    let highest = recorded
        .iter()
        .map(|(_, env)| counter_of(env))
        .max()
        .unwrap();
    assert!(highest < MAX_SKIP);
    let mut chain = SendingChain::new(handout.chain_key);
    let mut chain_keys: Vec<(u64, [u8; 32])> = Vec::new();
    let mut message_keys: HashMap<[u8; 32], (String, MessageKey)> = HashMap::new();
    for counter in handout.next_counter..=highest {
        chain_keys.push((counter, chain.distribution().0));
        let (_, key) = chain.step().unwrap();
        if let Some((label, env)) = recorded.iter().find(|(_, e)| counter_of(e) == counter) {
            assert!(
                env.open_chain(&key).is_ok(),
                "the test derives {label}'s key"
            );
            message_keys.insert(key.key, (label.clone(), key));
        }
    }
    assert_eq!(message_keys.len(), recorded.len());

    // 1. The attacker's search: every 32 bytes of every chain state in the
    //    copied database, as a stored message key and as a chain key walked
    //    forward. A chain key of counter j gives at step k the key of
    //    counter j + k, so walking to the highest recorded counter finds
    //    all that walking MAX_SKIP would. A derived key opens a recorded
    //    envelope exactly when it is that envelope's key: it is compared
    //    with those (a trial decryption each is too slow in a debug build),
    //    and a match is confirmed by opening the envelope.
    let db = rusqlite::Connection::open(copy.path().join("weft.db")).unwrap();
    let states: Vec<Vec<u8>> = db
        .prepare("SELECT state FROM chains")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    drop(db);
    assert!(!states.is_empty(), "the copy holds chain states");
    let mut opened: BTreeSet<String> = BTreeSet::new();
    let mut opens = |key: &[u8; 32], how: &str| {
        if let Some((label, mk)) = message_keys.get(key) {
            let (_, env) = recorded.iter().find(|(l, _)| l == label).unwrap();
            assert!(env.open_chain(mk).is_ok());
            opened.insert(format!("{how} stored in a chain state opens {label}"));
        }
    };
    for state in &states {
        for window in state.windows(32) {
            let candidate: [u8; 32] = window.try_into().unwrap();
            opens(&candidate, "a message key");
            let mut walk = SendingChain::new(candidate);
            for _ in 0..=highest {
                let (_, key) = walk.step().unwrap();
                opens(&key.key, "a chain key");
            }
        }
    }
    broken.extend(opened);

    // 2. The key handout as recorded on the wire: every secret key the
    //    copy holds (identity.key, the database) is tried on it.
    for (what, secret) in opening_secrets_in(copy.path()) {
        let key = StaticSecret::from(secret);
        if handouts
            .iter()
            .any(|(env, _)| env.open_sealed(&bob_device, &key).is_ok())
        {
            broken.push(format!("the copy's {what} opens alice's key handout"));
        }
    }

    // 3. Any remnant anywhere in the copied files (an old chain state in a
    //    free page or the -wal): none of those keys, as raw bytes.
    // 4. The deleted message: neither its text nor its envelope.
    let tail = &deleted_bytes[deleted_bytes.len() - 96..];
    for (name, bytes) in &files {
        for (counter, chain_key) in &chain_keys {
            if contains(bytes, chain_key) {
                broken.push(format!("{name} holds the chain key of counter {counter}"));
            }
        }
        for (_, sealed_to) in &handouts {
            if contains(bytes, sealed_to) {
                broken.push(format!(
                    "{name} holds the key alice's handout was sealed to"
                ));
            }
        }
        for (key, (label, _)) in &message_keys {
            if contains(bytes, key) {
                broken.push(format!("{name} holds the message key of {label}"));
            }
        }
        if contains(bytes, deleted_text.as_bytes()) {
            broken.push(format!("{name} holds the deleted message's text"));
        }
        if contains(bytes, tail) {
            broken.push(format!(
                "{name} holds the deleted message's envelope (its ciphertext and signature)"
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "a copy of bob's stopped home breaks forward secrecy or keeps a deleted message:\n{}",
        broken.join("\n")
    );

    // The history is intact: everything but the deleted message is shown.
    let bob = TestNode::start_offline("bob", bob.dir).await;
    let shown = bob.messages("alice").await;
    for (i, (text, id, _)) in sent.iter().enumerate() {
        let m = shown
            .iter()
            .find(|m| m["id"] == id.as_str())
            .unwrap_or_else(|| panic!("message {} is gone from bob's history", i + 1));
        if i + 1 == DELETED {
            assert_eq!(m["deleted"], true);
            assert_eq!(m["text"], "");
        } else {
            assert_eq!(m["text"], text.as_str());
            assert_eq!(m["deleted"], false);
        }
    }
    assert!(shown.iter().any(|m| m["text"] == "hello"));
}

/// The receiving chains `node` (device `me`) holds, as (conversation,
/// sender device, epoch, skipped keys), read through a second connection
/// to its store.
fn receiving_chains(
    node: &TestNode,
    me: &weft_node::ids::DeviceId,
) -> Vec<(
    weft_node::ids::ConversationId,
    weft_node::ids::DeviceId,
    u64,
    usize,
)> {
    let home = weft_node::home::Home::new(node.dir.path().join("home"));
    let store = weft_node::store::Store::open(&home.db_path()).unwrap();
    store
        .db()
        .receiving_chain_states(me)
        .unwrap()
        .into_iter()
        .map(|(place, bytes)| {
            let chain = ReceivingChain::from_bytes(&bytes, weft_node::now_ms()).unwrap();
            (
                place.conversation,
                place.sender,
                place.epoch,
                chain.skipped_len(),
            )
        })
        .collect()
}

/// A skipped key goes after the max age even if its chain never moves
/// again, and the message it was kept for stays unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_key_is_forgotten_after_the_max_age_on_a_quiet_chain() {
    let mut alice = TestNode::start("alice", 143, &[]).await;
    let mut bob = TestNode::start("bob", 144, &[&alice]).await;
    befriend(&alice, &bob).await;
    alice.send("bob", "hello").await;
    bob.expect_text("alice", "hello").await;
    alice.stop().await;
    bob.stop().await;
    let alice = TestNode::start_offline("alice", alice.dir).await;
    let short = Settings {
        skipped_key_max_age: Duration::from_secs(2),
        ..Settings::default()
    };
    let bob = TestNode::start_offline_with("bob", bob.dir, short).await;
    let bob_device = Identity::from_seed(b"bob/144", 0).unwrap().device_id();
    let alice_device = Identity::from_seed(b"alice/143", 0).unwrap().device_id();

    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        let id = alice.send("bob", text).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        sent.push(alice.envelope_bytes(&id));
    }
    let skipped = |chains: &[(_, weft_node::ids::DeviceId, u64, usize)]| -> usize {
        chains
            .iter()
            .filter(|c| c.1 == alice_device)
            .map(|c| c.3)
            .sum()
    };
    // "two" does not come: its key is skipped (with those alice's restart
    // skipped: her counters resume past a reservation).
    assert_eq!(bob.handle.deliver(vec![sent[0].clone()]).await.unwrap(), 1);
    bob.expect_text("alice", "one").await;
    let before = skipped(&receiving_chains(&bob, &bob_device));
    assert_eq!(bob.handle.deliver(vec![sent[2].clone()]).await.unwrap(), 1);
    bob.expect_text("alice", "three").await;
    assert_eq!(
        skipped(&receiving_chains(&bob, &bob_device)),
        before + 1,
        "the key of \"two\" is kept for it"
    );
    poll_until("the skipped key never expired", || async {
        (skipped(&receiving_chains(&bob, &bob_device)) == 0).then_some(())
    })
    .await;

    // "two" arrives too late: it is not refused as hostile, and not read.
    assert_eq!(bob.handle.deliver(vec![sent[1].clone()]).await.unwrap(), 1);
    let texts = bob.texts("alice").await;
    assert!(!texts.iter().any(|t| t == "two"), "{texts:?}");
    assert!(texts.iter().any(|t| t == "three"));
}

/// Without one-time keys (none issued, or all used), key handouts are
/// sealed to the recipient's handout key, not to the certified DH key in
/// `identity.key`; once that handout key has been replaced and its max age
/// passed, a copy of the recipient's home opens none of the handouts
/// captured on the wire (and so none of the chains they carried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_home_opens_no_key_handout_once_its_handout_key_is_replaced() {
    let short = Settings {
        skipped_key_max_age: Duration::from_secs(2),
        handout_key_rotation: Duration::from_secs(2),
        one_time_keys: 0,
        ..Settings::default()
    };
    let alice = TestNode::start("alice", 148, &[]).await;
    let mut bob = TestNode::start_with("bob", 149, &[&alice], short).await;
    befriend(&alice, &bob).await;
    let bob_id = bob.identity();
    let bob_device = bob_id.device_id();
    poll_until("alice never got bob's handout key", || async {
        alice.handout_key_of(&bob_device).map(|_| ())
    })
    .await;
    for text in ["one", "two", "three"] {
        alice.send("bob", text).await;
    }
    bob.expect_text("alice", "three").await;
    // What alice sealed to bob, as it went on the wire.
    let to_bob: Vec<Envelope> = alice
        .sealed_envelopes(|c| c.kind == ConversationKind::Direct)
        .iter()
        .map(|bytes| Envelope::decode(bytes).unwrap())
        .filter(|env| match &env.header.sealing {
            Sealing::Sealed { recipients, .. } => recipients.iter().any(|r| r.device == bob_device),
            Sealing::Chain { .. } => false,
        })
        .collect();
    let opens = |env: &Envelope, keys: &[[u8; 32]]| {
        keys.iter().any(|k| {
            env.open_sealed(&bob_device, &x25519_dalek::StaticSecret::from(*k))
                .is_ok()
        })
    };
    let certified = bob_id.device_dh_secret().to_bytes();
    // Which of them are key handouts (chains), read while bob can.
    let mut held = bob.own_handout_secrets();
    held.push(certified);
    let handouts: Vec<&Envelope> = to_bob
        .iter()
        .filter(|env| {
            held.iter().any(|k| {
                env.open_sealed(&bob_device, &x25519_dalek::StaticSecret::from(*k))
                    .ok()
                    .and_then(|(_, plain)| Payload::decode(&plain))
                    .is_some_and(|p| matches!(p, Payload::SenderKey(_)))
            })
        })
        .collect();
    assert!(!handouts.is_empty(), "alice handed bob her chain");
    for handout in &handouts {
        assert!(
            !opens(handout, &[certified]),
            "alice's key handout was sealed to bob's certified key"
        );
    }
    // Bob replaces his handout key and erases the old one in time.
    poll_until("bob still holds the key alice sealed to", || async {
        let now = bob.own_handout_secrets();
        handouts.iter().all(|h| !opens(h, &now)).then_some(())
    })
    .await;
    bob.stop().await;
    // The copy: every key in it.
    let copy = TestNode::start_offline("bob", bob.dir).await;
    let mut keys = copy.own_handout_secrets();
    keys.push(copy.identity().device_dh_secret().to_bytes());
    for handout in &handouts {
        assert!(!opens(handout, &keys), "the copy opens a key handout");
    }
    // Bob still reads what he received.
    assert_eq!(copy.texts("alice").await, ["one", "two", "three"]);
}

/// A member added to a group is handed every member's handout key (not
/// only the adder's), so what it seals to them goes to keys that will be
/// erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_to_a_group_gets_the_members_handout_keys() {
    let alice = TestNode::start("alice", 150, &[]).await;
    let bob = TestNode::start("bob", 150, &[&alice]).await;
    let carol = TestNode::start("carol", 150, &[&alice, &bob]).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    alice.call(common::group_create("duo", &["bob"])).await;
    alice.send("duo", "hi").await;
    bob.expect_text("duo", "hi").await;
    alice
        .call(Request::GroupAdd {
            group: "duo".into(),
            member: "carol".into(),
        })
        .await;
    // Bob and carol are not contacts: only the group introduced them.
    let bob_device = bob.identity().device_id();
    poll_until("carol never got bob's handout key", || async {
        carol.handout_key_of(&bob_device).map(|_| ())
    })
    .await;
}

/// A sender's chain of an earlier epoch goes once a newer one has been
/// here for the max age; this device's own sending chain of an earlier
/// epoch goes at once. What was read stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_of_a_replaced_epoch_are_forgotten() {
    let short = Settings {
        skipped_key_max_age: Duration::from_secs(2),
        ..Settings::default()
    };
    let alice = TestNode::start("alice", 145, &[]).await;
    let bob = TestNode::start_with("bob", 146, &[&alice], short).await;
    let bob_device = Identity::from_seed(b"bob/146", 0).unwrap().device_id();
    let alice_device = Identity::from_seed(b"alice/145", 0).unwrap().device_id();
    befriend(&alice, &bob).await;
    let group = alice.call(common::group_create("duo", &["bob"])).await;
    let conversation: weft_node::ids::ConversationId =
        group["id"].as_str().unwrap().parse().unwrap();
    alice.send("duo", "one").await;
    bob.expect_text("duo", "one").await;
    bob.send("duo", "two").await;
    alice.expect_text("duo", "two").await;
    let epochs_of = |sender: &weft_node::ids::DeviceId| -> Vec<u64> {
        let home = weft_node::home::Home::new(bob.dir.path().join("home"));
        let store = weft_node::store::Store::open(&home.db_path()).unwrap();
        let mut epochs: Vec<u64> = (0..16)
            .filter(|&e| {
                store
                    .db()
                    .get_chain(&conversation, sender, e)
                    .unwrap()
                    .is_some()
            })
            .collect();
        epochs.sort_unstable();
        epochs
    };
    let first_alice = epochs_of(&alice_device);
    let first_bob = epochs_of(&bob_device);
    assert_eq!(first_alice.len(), 1, "{first_alice:?}");
    assert_eq!(first_bob.len(), 1, "{first_bob:?}");

    // A group change: every member starts a new chain.
    alice
        .call(Request::GroupAdmin {
            group: "duo".into(),
            member: "bob".into(),
        })
        .await;
    alice.send("duo", "three").await;
    bob.expect_text("duo", "three").await;
    bob.send("duo", "four").await;
    alice.expect_text("duo", "four").await;

    poll_until("the replaced chains were never forgotten", || async {
        let (a, b) = (epochs_of(&alice_device), epochs_of(&bob_device));
        (a.len() == 1 && b.len() == 1 && a != first_alice && b != first_bob).then_some(())
    })
    .await;
    assert!(
        receiving_chains(&bob, &bob_device)
            .iter()
            .all(|c| c.0 != conversation || c.2 > first_alice[0]),
        "only alice's newest chain is left"
    );
    let texts = bob.texts("duo").await;
    for text in ["one", "two", "three", "four"] {
        assert!(texts.iter().any(|t| t == text), "{text} is gone: {texts:?}");
    }
}

/// A deleted message's envelope is erased, so a deletion goes into its
/// shard even while its message is missing (else what builds on it would
/// wait for ever). That must not let a member delete what it may not:
/// carol deletes alice's message before it reaches bob; when it comes, it
/// stays, and alice can still delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_taken_in_before_its_message_erases_it_only_if_allowed() {
    const SEED: u64 = 147;
    let alice = TestNode::start("alice", SEED, &[]).await;
    let mut bob = TestNode::start("bob", SEED, &[&alice]).await;
    let carol = TestNode::start("carol", SEED, &[&alice, &bob]).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    let group = alice
        .call(common::group_create("trio", &["bob", "carol"]))
        .await;
    let conversation: weft_node::ids::ConversationId =
        group["id"].as_str().unwrap().parse().unwrap();
    alice.send("trio", "first").await;
    bob.expect_text("trio", "first").await;
    // Bob goes off the network: he hears what the test hands him.
    bob.stop().await;
    let bob = TestNode::start_offline("bob", bob.dir).await;
    let bob_id = Identity::from_seed(format!("bob/{SEED}").as_bytes(), 0).unwrap();
    let carol_id = Identity::from_seed(format!("carol/{SEED}").as_bytes(), 0).unwrap();

    let sent = alice.send("trio", "alice's second").await;
    let id: weft_node::ids::MessageId = sent["id"].as_str().unwrap().parse().unwrap();
    let hlc = alice
        .messages("trio")
        .await
        .iter()
        .find(|m| m["id"] == id.to_string().as_str())
        .map(|m| weft_node::hlc::Hlc(m["hlc"].as_u64().unwrap()))
        .unwrap();
    let second = alice.envelope_bytes(&id.to_string());
    let tag = common::tag_of(&second);

    // Carol, a plain member, crafts a deletion of it with her real keys
    // (Weft would refuse to make it), and bob takes it in first.
    let mut chain = SendingChain::new([0x5a; 32]);
    let (chain_key, next_counter) = chain.distribution();
    let handout = seal_to_devices(
        carol_id.device_signing_key(),
        tag,
        conversation,
        &[(bob_id.device_id(), bob_id.certificate().dh)],
        [0x11; 32],
        [0x22; 32],
        &Payload::SenderKey(SenderKey {
            epoch: 777,
            chain_key,
            next_counter,
            sender_cert: carol_id.certificate().clone(),
            sender_name: "Carol".into(),
        })
        .encode(),
    )
    .unwrap();
    let change = weft_crdt::Annotations::new(&carol_id.device_id().0)
        .delete(&id.0)
        .unwrap();
    let (counter, key) = chain.step().unwrap();
    let deletion = seal_chain(
        carol_id.device_signing_key(),
        tag,
        777,
        counter,
        &key,
        &Payload::Annotate(Annotate {
            message: id,
            period: weft_node::payload::shard_of(1, hlc),
            change,
            edit: None,
        })
        .encode(),
    )
    .unwrap();
    bob.handle
        .deliver(vec![handout.into_bytes(), deletion.into_bytes()])
        .await
        .unwrap();

    // The message comes: it is shown, not erased.
    assert_eq!(bob.handle.deliver(vec![second]).await.unwrap(), 1);
    let shown = bob
        .wait_messages("trio", "alice's second", |ms| {
            ms.iter().any(|m| m["id"] == id.to_string().as_str())
        })
        .await;
    let m = shown
        .iter()
        .find(|m| m["id"] == id.to_string().as_str())
        .unwrap();
    assert_eq!(m["text"], "alice's second");
    assert_eq!(m["deleted"], false);
    let stored = {
        let home = weft_node::home::Home::new(bob.dir.path().join("home"));
        let store = weft_node::store::Store::open(&home.db_path()).unwrap();
        store.db().envelope(&id).unwrap()
    };
    assert!(stored.is_some(), "its envelope is kept");

    // alice, its sender, may delete it: that erases it.
    let before = alice.chain_envelopes(|c| c.id == conversation);
    alice.call(Request::Delete { id: id.to_string() }).await;
    let change: Vec<Vec<u8>> = alice
        .chain_envelopes(|c| c.id == conversation)
        .into_iter()
        .filter(|e| !before.contains(e))
        .collect();
    bob.handle.deliver(change).await.unwrap();
    bob.wait_messages("trio", "alice's deletion", |ms| {
        ms.iter()
            .any(|m| m["id"] == id.to_string().as_str() && m["deleted"] == true)
    })
    .await;
}

/// The one-time keys of `issuer` that `node` holds (read through a second
/// connection to its store).
fn held_one_time_keys(node: &TestNode, issuer: &weft_node::ids::DeviceId) -> Vec<[u8; 32]> {
    let home = weft_node::home::Home::new(node.dir.path().join("home"));
    let db = rusqlite::Connection::open(home.db_path()).unwrap();
    db.prepare("SELECT public FROM one_time_keys WHERE issuer = ?1")
        .unwrap()
        .query_map([issuer.0], |row| row.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|k| k.unwrap().try_into().unwrap())
        .collect()
}

/// Which of `secrets` opens `env` for `device`, and the payload inside.
fn opened_by(
    env: &Envelope,
    device: &weft_node::ids::DeviceId,
    secrets: &[(&'static str, [u8; 32])],
) -> Option<(&'static str, [u8; 32], Payload)> {
    secrets.iter().find_map(|(what, secret)| {
        let (_, plain) = env.open_sealed(device, &StaticSecret::from(*secret)).ok()?;
        Some((*what, *secret, Payload::decode(&plain)?))
    })
}

/// A key handout is sealed to one of the recipient's one-time keys, which
/// the sender then forgets and the recipient erases once it opened it;
/// the recipient tops the sender's supply up once half is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_key_is_used_once_and_replaced() {
    let two = Settings {
        one_time_keys: 2,
        ..Settings::default()
    };
    let alice = TestNode::start("alice", 151, &[]).await;
    let bob = TestNode::start_with("bob", 152, &[&alice], two).await;
    befriend(&alice, &bob).await;
    let bob_device = bob.identity().device_id();
    let alice_device = alice.identity().device_id();
    let first = poll_until("alice never got bob's two one-time keys", || async {
        let held = held_one_time_keys(&alice, &bob_device);
        (held.len() == 2).then_some(held)
    })
    .await;
    let truth = opening_secrets_in(&bob.dir.path().join("home"));

    alice.send("bob", "hello").await;
    bob.expect_text("alice", "hello").await;
    // The handout of alice's chain: sealed to one of those two keys.
    let handout = bob
        .sealed_envelopes(|c| c.kind == ConversationKind::Direct)
        .into_iter()
        .map(|bytes| Envelope::decode(&bytes).unwrap())
        .filter(|env| env.header.sender == alice_device)
        .find_map(|env| match opened_by(&env, &bob_device, &truth) {
            Some((what, secret, Payload::SenderKey(_))) => Some((env, what, secret)),
            _ => None,
        })
        .expect("bob holds alice's key handout");
    let (handout, what, secret) = handout;
    assert_eq!(
        what, "one-time key",
        "alice's handout was sealed to bob's {what}"
    );
    let used = x25519_dalek::PublicKey::from(&StaticSecret::from(secret)).to_bytes();
    assert!(first.contains(&used));
    // Bob erased it; nothing he holds opens the handout any more.
    let now = opening_secrets_in(&bob.dir.path().join("home"));
    assert!(
        opened_by(&handout, &bob_device, &now).is_none(),
        "bob can still open alice's handout"
    );
    // Half of alice's supply is used: bob sends her a new key, and she
    // never holds the used one again.
    poll_until("bob never topped alice's one-time keys up", || async {
        let held = held_one_time_keys(&alice, &bob_device);
        (held.len() == 2 && !held.contains(&used)).then_some(())
    })
    .await;
}

/// A key handout for a group the recipient has not heard of yet waits
/// pending, and so keeps its one-time key: it opens once the group's
/// state arrives, and only then is the key erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_key_handout_keeps_its_one_time_key_until_taken() {
    let mut alice = TestNode::start("alice", 153, &[]).await;
    let mut bob = TestNode::start("bob", 154, &[&alice]).await;
    befriend(&alice, &bob).await;
    let bob_device = bob.identity().device_id();
    let alice_device = alice.identity().device_id();
    poll_until("alice never got bob's one-time keys", || async {
        (alice.one_time_keys_of(&bob_device) > 0).then_some(())
    })
    .await;
    alice.stop().await;
    bob.stop().await;
    let alice = TestNode::start_offline("alice", alice.dir).await;
    let bob = TestNode::start_offline("bob", bob.dir).await;

    alice.call(common::group_create("duo", &["bob"])).await;
    alice.send("duo", "in the group").await;
    let truth = opening_secrets_in(&bob.dir.path().join("home"));
    let mut handout = None;
    let mut others = Vec::new();
    for bytes in alice.sealed_envelopes(|c| c.kind == ConversationKind::Group) {
        let env = Envelope::decode(&bytes).unwrap();
        match opened_by(&env, &bob_device, &truth) {
            Some((what, secret, Payload::SenderKey(sk)))
                if sk.sender_cert.device == alice_device =>
            {
                assert_eq!(what, "one-time key");
                handout = Some((bytes, secret));
            }
            _ => others.push(bytes),
        }
    }
    let (handout, secret) = handout.expect("alice handed bob her group chain");
    let holds_it = || {
        opening_secrets_in(&bob.dir.path().join("home"))
            .iter()
            .any(|(_, s)| *s == secret)
    };
    // The message, then the handout: the group is unknown, both wait.
    bob.handle
        .deliver(
            alice
                .chain_envelopes(|c| c.kind == ConversationKind::Group)
                .into_iter()
                .collect(),
        )
        .await
        .unwrap();
    bob.handle.deliver(vec![handout]).await.unwrap();
    assert!(holds_it(), "bob erased the key of a handout still pending");
    // The group's state: the handout is taken, the message read, the key gone.
    bob.handle.deliver(others).await.unwrap();
    bob.expect_text("duo", "in the group").await;
    assert!(!holds_it(), "bob kept the key of a handout he took");
}
