//! A slow consumer: a member device that stops reading (its swarm is held
//! and never polled again, so its connection to alice stalls) does not
//! grow alice's memory without bound, and alice's other contact still
//! gets every message, once and in order.
//!
//! Alice, bob and carol share the group "trio". Carol's node is stopped
//! and a bare libp2p peer with her device key takes her place: it joins
//! the group's topic (alice lets her device on it), receives one message,
//! and then is never polled again. Alice sends the group `SLOW_MESSAGES`
//! messages of about 1 KiB (CI: 2,000) in two rounds, as many with carol
//! simply away before, and the test samples the process's RSS after each
//! round. Gossipsub's send queue for the stalled peer fills (it is bounded,
//! `GOSSIP_QUEUE` in `net::behaviour`), and once as many messages again are
//! dropped for it alice closes its connection: the peer is dropped (not
//! banned: it comes back and is heard), and a round with it stalled costs
//! no more memory than one with it away, give or take allocator noise.
//! docs/performance.md reports a larger run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, TestNode};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Swarm};
use weft_node::api::Request;
use weft_proto::transport::{SwarmConfig, TransportKind, build_swarm};

/// The process's resident set, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The topic of the conversation `name` in `node`'s store.
fn topic_of(node: &TestNode, name: &str) -> String {
    let home = weft_node::home::Home::new(node.dir.path().join("home"));
    let store = weft_node::store::Store::open(&home.db_path()).unwrap();
    let conversations = store.db().conversations().unwrap();
    conversations
        .into_iter()
        .find(|c| c.name == name)
        .unwrap()
        .topic
}

/// Whether `node` holds a connection to `peer`.
async fn holds(node: &TestNode, peer: PeerId) -> bool {
    let status = node.call(Request::Status).await;
    let peer = peer.to_string();
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["peer_id"] == peer.as_str())
}

/// A bare gossipsub peer with `key` (a member device's), subscribed to
/// `topic` and connected to `alice`, returned once it has received one of
/// alice's messages there: from then on alice sends it what she
/// publishes. Alice asks every half second until then (what she sends is
/// pushed to `sent`).
async fn join_then_stall(
    key: libp2p::identity::Keypair,
    topic: &str,
    alice: &TestNode,
    sent: &mut Vec<String>,
) -> Swarm<gossipsub::Behaviour> {
    let config = SwarmConfig {
        transport: TransportKind::Memory,
        idle_connection_timeout: Duration::from_secs(3600),
        bandwidth_metrics: None,
    };
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Anonymous)
        .max_transmit_size(weft_node::crypto::envelope::MAX_ENVELOPE_BYTES + 16 * 1024)
        .build()
        .unwrap();
    let mut swarm = build_swarm(key, config, |_| {
        gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gossip_config).unwrap()
    })
    .unwrap();
    swarm
        .behaviour_mut()
        .subscribe(&IdentTopic::new(topic))
        .unwrap();
    swarm.dial(alice.dial_addr()).unwrap();
    let alice_peer = alice.handle.peer_id();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut ask = tokio::time::interval(Duration::from_millis(500));
    let mut alice_subscribed = false;
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, .. })
                    if peer_id == alice_peer => alice_subscribed = true,
                SwarmEvent::Behaviour(gossipsub::Event::Message { .. }) => return swarm,
                _ => {}
            },
            _ = ask.tick(), if alice_subscribed => {
                let text = format!("carol, are you there? {}", sent.len());
                alice.send("trio", &text).await;
                sent.push(text);
            }
            _ = tokio::time::sleep_until(deadline) => {
                panic!("the stalled peer never got a message from alice")
            }
        }
    }
}

/// Waits until `node`'s latest message in `target` is `text`.
async fn wait_latest(node: &TestNode, target: &str, text: &str) {
    common::poll_until(&format!("{text:?} to be the latest"), || async {
        let latest = node
            .call(Request::Messages {
                target: target.into(),
                limit: Some(1),
                before: None,
            })
            .await;
        (latest[0]["text"] == text).then_some(())
    })
    .await;
}

/// Every text of `target` that `node` shows, oldest first, read a page at
/// a time.
async fn all_texts(node: &TestNode, target: &str) -> Vec<String> {
    let mut texts = Vec::new();
    let mut before = None;
    loop {
        let page = node
            .call(Request::Messages {
                target: target.into(),
                limit: Some(1_000),
                before: before.clone(),
            })
            .await;
        let page = page.as_array().unwrap();
        if page.is_empty() {
            break;
        }
        before = Some(page[0]["id"].as_str().unwrap().to_string());
        let mut older: Vec<String> = page
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_string())
            .collect();
        older.append(&mut texts);
        texts = older;
    }
    texts
}

/// The text of message `n` of a round: about 1 KiB, so that what alice
/// holds for a peer shows in her memory.
fn text(what: &str, round: usize, n: usize) -> String {
    format!("{what} round {round} message {n} {}", "x".repeat(1000))
}

/// Sends `rounds` rounds of `per_round` messages from alice to the
/// group (pushed to `sent`), each round until bob has its last; the RSS
/// growth of each round, in bytes.
async fn rounds(
    what: &str,
    alice: &TestNode,
    bob: &TestNode,
    (rounds, per_round): (usize, usize),
    sent: &mut Vec<String>,
    stalled: Option<PeerId>,
) -> Vec<i64> {
    let mut growth = Vec::new();
    let mut rss = rss_bytes();
    for round in 0..rounds {
        let started = Instant::now();
        for n in 0..per_round {
            let text = text(what, round, n);
            alice.send("trio", &text).await;
            sent.push(text);
        }
        wait_latest(bob, "trio", sent.last().unwrap()).await;
        let now = rss_bytes();
        growth.push(now as i64 - rss as i64);
        let held = match stalled {
            Some(peer) => format!(
                "; alice holds the stalled peer: {}",
                holds(alice, peer).await
            ),
            None => String::new(),
        };
        eprintln!(
            "{what} round {round}: {per_round} messages delivered to bob in {:.2?}; \
             RSS {:.1} MiB ({:+.1} MiB){held}",
            started.elapsed(),
            mib(now as i64),
            mib(now as i64 - rss as i64),
        );
        rss = now;
    }
    growth
}

/// Above what a round costs with carol away, a round with her stalled may
/// cost this much more (RSS is the whole process's: allocator noise).
const RSS_SLACK: i64 = 16 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_reading_is_dropped_and_costs_bounded_memory() {
    const ROUNDS: usize = 2;
    let messages: usize = std::env::var("SLOW_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let shape = (ROUNDS, messages.div_ceil(ROUNDS));
    let (alice, bob, mut carol) = common::trio(44).await;
    alice.send("trio", "hi").await;
    bob.expect_text("trio", "hi").await;
    carol.expect_text("trio", "hi").await;
    let mut sent = vec!["hi".to_string()];

    // Carol's node goes: first alice sends with carol away (the reference:
    // what a message costs anyway, carol missing it), then a peer with
    // carol's device key takes her place and stalls.
    let topic = topic_of(&alice, "trio");
    let carol_key = carol.identity().libp2p_keypair().unwrap();
    let carol_peer = carol_key.public().to_peer_id();
    carol.stop().await;
    common::poll_until("alice to see carol's node go", || async {
        (!holds(&alice, carol_peer).await).then_some(())
    })
    .await;
    let away = rounds("away", &alice, &bob, shape, &mut sent, None).await;

    let stalled = join_then_stall(carol_key.clone(), &topic, &alice, &mut sent).await;
    assert!(holds(&alice, carol_peer).await);
    // From here the stalled peer's swarm is never polled.
    let started = Instant::now();
    let stall = rounds("stalled", &alice, &bob, shape, &mut sent, Some(carol_peer)).await;
    let fmt = |g: &[i64]| {
        g.iter()
            .map(|g| format!("{:+.1}", mib(*g)))
            .collect::<Vec<_>>()
    };
    eprintln!(
        "{} messages sent with a peer stalled, in {:.2?}; RSS growth per round (MiB): \
         carol away {:?}, stalled {:?}",
        shape.0 * shape.1,
        started.elapsed(),
        fmt(&away),
        fmt(&stall),
    );

    // Her send queue full, alice drops her (gossipsub's slow peer).
    common::poll_until("alice to drop the stalled peer", || async {
        (!holds(&alice, carol_peer).await).then_some(())
    })
    .await;
    // Dropped, not banned: carol's device comes back and is heard.
    let back = join_then_stall(carol_key, &topic, &alice, &mut sent).await;
    let reference = away.iter().copied().max().unwrap();
    assert!(
        stall[ROUNDS - 1] <= reference + RSS_SLACK,
        "the last round with a stalled peer grew the RSS by {:.1} MiB, a round with it away by {:.1} MiB",
        mib(stall[ROUNDS - 1]),
        mib(reference),
    );
    let texts = all_texts(&bob, "trio").await;
    assert_eq!(texts.len(), sent.len(), "bob has every message once");
    assert!(texts == sent, "bob has every message in order");
    drop((stalled, back));
}
