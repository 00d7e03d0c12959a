//! Multi-node tests of the network task on the memory transport:
//! gossip and direct requests between two nodes, redialing a peer that
//! restarts, listening and being reached through a circuit relay (and
//! again after the relay restarts), and the topic gate keeping strangers
//! off a conversation's gossip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, relay};
use tokio::sync::{mpsc, oneshot};
use weft_node::net::{NetCommand, NetConfig, NetEvent, NetHandle, PeerSource, spawn};
use weft_proto::transport::{SwarmConfig, TransportKind, build_swarm};

/// Waits until `events` yields a `Connected` (or `Disconnected`) of
/// `peer`, failing at `deadline`.
async fn wait_for(
    events: &mut mpsc::Receiver<NetEvent>,
    peer: PeerId,
    connected: bool,
    deadline: tokio::time::Instant,
) {
    loop {
        let ev = next_event(events, deadline).await;
        match ev {
            NetEvent::Connected { peer: p, .. } if connected && p == peer => return,
            NetEvent::Disconnected { peer: p } if !connected && p == peer => return,
            _ => {}
        }
    }
}

#[tokio::test]
async fn reconnects_after_peer_restarts_on_same_address() {
    let a_key = libp2p::identity::Keypair::generate_ed25519();
    let a_peer = a_key.public().to_peer_id();
    let port = 1_100_000 + u64::from(std::process::id() % 1000);
    // A DHT client, so that b's Kademlia does not dial it back on its
    // own: the reconnection must come from the redial timer.
    let mut a_config = NetConfig::memory(port);
    a_config.dht_server = false;
    let (a, _a_events, a_task) = spawn(a_key.clone(), a_config.clone()).unwrap();
    let mut b_config = NetConfig::memory(port + 1);
    b_config.bootstrap = vec![format!("/memory/{port}/p2p/{a_peer}").parse().unwrap()];
    b_config.redial_base = Duration::from_millis(100);
    let (_b, mut b_events, _) =
        spawn(libp2p::identity::Keypair::generate_ed25519(), b_config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    wait_for(&mut b_events, a_peer, true, deadline).await;
    a.shutdown().await;
    a_task.await.unwrap();
    wait_for(&mut b_events, a_peer, false, deadline).await;
    // Same identity, same address: b redials it on its own.
    let (_a, _a_events, _) = spawn(a_key, a_config).unwrap();
    wait_for(&mut b_events, a_peer, true, deadline).await;
}

/// A bare circuit relay v2 server on the memory transport (no ping, no
/// identify), running until the returned sender is used or dropped.
fn relay_server(key: libp2p::identity::Keypair, port: u64) -> (Multiaddr, oneshot::Sender<()>) {
    let config = SwarmConfig {
        transport: TransportKind::Memory,
        idle_connection_timeout: Duration::from_secs(60),
        bandwidth_metrics: None,
    };
    let mut swarm = build_swarm(key, config, |key| {
        relay::Behaviour::new(key.public().to_peer_id(), Default::default())
    })
    .unwrap();
    let addr = Multiaddr::empty().with(Protocol::Memory(port));
    let listener = swarm.listen_on(addr.clone()).unwrap();
    // What reservations hand out.
    swarm.add_external_address(addr.clone());
    let peer = *swarm.local_peer_id();
    let (stop, mut stopped) = oneshot::channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = swarm.select_next_some() => {}
            }
        }
        // Frees the memory port (dropping the swarm would not).
        swarm.remove_listener(listener);
    });
    (addr.with(Protocol::P2p(peer)), stop)
}

/// The next `Listening` address of `events`, failing at `deadline`.
async fn next_listening(
    events: &mut mpsc::Receiver<NetEvent>,
    deadline: tokio::time::Instant,
) -> Multiaddr {
    loop {
        let ev = next_event(events, deadline).await;
        if let NetEvent::Listening { addr } = ev {
            return addr;
        }
    }
}

#[tokio::test]
async fn a_node_listens_through_its_relay_again_after_the_relay_restarts() {
    let port = 1_300_000 + u64::from(std::process::id() % 1000) * 10;
    let relay_key = libp2p::identity::Keypair::generate_ed25519();
    let relay_peer = relay_key.public().to_peer_id();
    let (relay_addr, relay) = relay_server(relay_key.clone(), port);
    let mut config = NetConfig::memory(port + 1);
    config.relays = vec![relay_addr.clone()];
    config.redial_base = Duration::from_millis(100);
    let (a, mut events, _) = spawn(libp2p::identity::Keypair::generate_ed25519(), config).unwrap();
    let circuit = relay_addr.clone().with(Protocol::P2pCircuit);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while next_listening(&mut events, deadline).await != circuit {}
    drop(relay);
    wait_for(&mut events, relay_peer, false, deadline).await;
    // The circuit listener is gone with the connection.
    loop {
        let listen = a.status().await.unwrap().listen;
        if !listen.contains(&circuit) {
            assert_eq!(listen.len(), 1, "{listen:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {listen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Back (same key, same address): redialed, and listened through.
    let (_, _relay) = relay_server(relay_key, port);
    while next_listening(&mut events, deadline).await != circuit {}
    let listen = a.status().await.unwrap().listen;
    assert_eq!(listen.len(), 2, "{listen:?}");
    assert_eq!(listen[1], circuit, "direct addresses first");
}

#[tokio::test]
async fn a_node_listens_through_its_relay_and_is_reached_there() {
    let port = 1_200_000 + u64::from(std::process::id() % 1000) * 10;
    let (relay_addr, _relay) = relay_server(libp2p::identity::Keypair::generate_ed25519(), port);
    let a_key = libp2p::identity::Keypair::generate_ed25519();
    let a_peer = a_key.public().to_peer_id();
    // Listening nowhere but through the relay: only a circuit reaches it.
    let mut a_config = NetConfig::memory(port + 1);
    a_config.listen.clear();
    a_config.relays = vec![relay_addr.clone()];
    let (a, mut a_events, _) = spawn(a_key, a_config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let listening = next_listening(&mut a_events, deadline).await;
    assert_eq!(listening, relay_addr.clone().with(Protocol::P2pCircuit));
    let status = a.status().await.unwrap();
    assert_eq!(status.listen, vec![listening]);

    let (b, mut b_events, _) = spawn(
        libp2p::identity::Keypair::generate_ed25519(),
        NetConfig::memory(port + 2),
    )
    .unwrap();
    let circuit = relay_addr
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(a_peer));
    b.send(NetCommand::Dial {
        peer: a_peer,
        addrs: vec![circuit.clone()],
        source: PeerSource::Manual,
    })
    .await
    .unwrap();
    loop {
        let ev = next_event(&mut b_events, deadline).await;
        if let NetEvent::Connected { peer, addr } = ev
            && peer == a_peer
        {
            assert_eq!(addr, circuit);
            break;
        }
    }
    let (tx, rx) = oneshot::channel();
    b.send(NetCommand::Direct {
        peer: a_peer,
        data: b"through the relay".to_vec(),
        reply: tx,
    })
    .await
    .unwrap();
    loop {
        let ev = next_event(&mut a_events, deadline).await;
        if let NetEvent::Direct { data, reply, .. } = ev {
            assert_eq!(data, b"through the relay");
            reply.send(b"ok".to_vec()).unwrap();
            break;
        }
    }
    assert_eq!(rx.await.unwrap().unwrap(), b"ok");
}

/// The next event of `events`, failing at `deadline`.
async fn next_event(
    events: &mut mpsc::Receiver<NetEvent>,
    deadline: tokio::time::Instant,
) -> NetEvent {
    tokio::time::timeout_at(deadline, events.recv())
        .await
        .expect("timed out")
        .expect("network task stopped")
}

/// A node on `/memory/{port}` that dials `bootstrap` (if any).
fn memory_node(
    port: u64,
    bootstrap: Option<(u64, PeerId)>,
) -> (NetHandle, mpsc::Receiver<NetEvent>, PeerId) {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let mut config = NetConfig::memory(port);
    config.redial_base = Duration::from_millis(100);
    if let Some((port, to)) = bootstrap {
        config.bootstrap = vec![format!("/memory/{port}/p2p/{to}").parse().unwrap()];
    }
    let (handle, events, _) = spawn(key, config).unwrap();
    (handle, events, peer)
}

/// Who the publishing node of the gate tests saw subscribe to what.
#[derive(Default)]
struct Seen {
    subscribed: Vec<(PeerId, String)>,
}

impl Seen {
    /// Waits (until `deadline`) for `events` to yield what `done` wants,
    /// noting every subscription on the way.
    async fn until(
        &mut self,
        events: &mut mpsc::Receiver<NetEvent>,
        deadline: tokio::time::Instant,
        mut done: impl FnMut(&NetEvent) -> bool,
    ) {
        loop {
            let ev = next_event(events, deadline).await;
            if let NetEvent::Subscribed { peer, topic } = &ev {
                self.subscribed.push((*peer, topic.clone()));
            }
            if done(&ev) {
                return;
            }
        }
    }

    /// Notes the subscriptions already queued, without waiting.
    fn drain(&mut self, events: &mut mpsc::Receiver<NetEvent>) {
        while let Ok(ev) = events.try_recv() {
            if let NetEvent::Subscribed { peer, topic } = ev {
                self.subscribed.push((peer, topic));
            }
        }
    }

    fn saw(&self, peer: PeerId, topic: &str) -> bool {
        self.subscribed
            .iter()
            .any(|(p, t)| *p == peer && t == topic)
    }
}

fn is_subscribed(ev: &NetEvent, who: PeerId, to: &str) -> bool {
    matches!(ev, NetEvent::Subscribed { peer, topic } if *peer == who && topic == to)
}

async fn publish(node: &NetHandle, topic: &str, data: &[u8]) {
    node.send(NetCommand::Publish {
        topic: topic.into(),
        data: data.to_vec(),
    })
    .await
    .unwrap();
}

/// The data of the next `n` gossip messages on `topic` at `events`.
async fn gossip_on(
    events: &mut mpsc::Receiver<NetEvent>,
    topic: &str,
    n: usize,
    deadline: tokio::time::Instant,
) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while got.len() < n {
        if let NetEvent::Gossip { topic: t, data, .. } = next_event(events, deadline).await
            && t == topic
        {
            got.push(data);
        }
    }
    got
}

/// Everything gossiped to `events` up to and including `marker` on
/// `control`. One peer's messages come over one stream in the order
/// they were published: whatever was sent before the marker is here.
async fn gossip_until_marker(
    events: &mut mpsc::Receiver<NetEvent>,
    control: &str,
    marker: &[u8],
    deadline: tokio::time::Instant,
) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        if let NetEvent::Gossip { topic, data, .. } = next_event(events, deadline).await {
            let end = topic == control && data == marker;
            got.push((topic, data));
            if end {
                return got;
            }
        }
    }
}

/// `a` publishes `n` messages on `topic`, `b` gets them all, then a
/// marker on `control`; returns what `s` got up to the marker.
async fn publish_and_watch(
    a: &NetHandle,
    b_events: &mut mpsc::Receiver<NetEvent>,
    s_events: &mut mpsc::Receiver<NetEvent>,
    topic: &str,
    control: &str,
    deadline: tokio::time::Instant,
) -> Vec<(String, Vec<u8>)> {
    let sent: Vec<Vec<u8>> = (0..5).map(|i| format!("secret {i}").into_bytes()).collect();
    for data in &sent {
        publish(a, topic, data).await;
    }
    assert_eq!(gossip_on(b_events, topic, sent.len(), deadline).await, sent);
    publish(a, control, b"marker").await;
    gossip_until_marker(s_events, control, b"marker", deadline).await
}

#[tokio::test]
async fn a_stranger_that_subscribes_to_our_topic_receives_nothing() {
    let port = 1_400_000 + u64::from(std::process::id() % 1000) * 10;
    let (topic, control) = ("conversation", "control");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (a, mut a_events, a_peer) = memory_node(port, None);
    let b_key = libp2p::identity::Keypair::generate_ed25519();
    let b_peer = b_key.public().to_peer_id();
    a.send(NetCommand::TopicMembers {
        topic: topic.into(),
        peers: vec![b_peer],
    })
    .await
    .unwrap();
    for t in [topic, control] {
        a.send(NetCommand::Subscribe(t.into())).await.unwrap();
    }
    // Commands are handled in order: the gate is set from here on.
    a.status().await.unwrap();

    let mut b_config = NetConfig::memory(port + 1);
    b_config.bootstrap = vec![format!("/memory/{port}/p2p/{a_peer}").parse().unwrap()];
    let (b, mut b_events, _) = spawn(b_key, b_config).unwrap();
    let (s, mut s_events, s_peer) = memory_node(port + 2, Some((port, a_peer)));
    b.send(NetCommand::Subscribe(topic.into())).await.unwrap();
    // The stranger asks for the topic first, then the control topic:
    // once a has its control subscription it has had the other.
    for t in [topic, control] {
        s.send(NetCommand::Subscribe(t.into())).await.unwrap();
    }
    let mut seen = Seen::default();
    let (mut b_in, mut s_in) = (false, false);
    seen.until(&mut a_events, deadline, |ev| {
        b_in |= is_subscribed(ev, b_peer, topic);
        s_in |= is_subscribed(ev, s_peer, control);
        b_in && s_in
    })
    .await;

    let got = publish_and_watch(&a, &mut b_events, &mut s_events, topic, control, deadline).await;
    assert_eq!(got, vec![(control.to_string(), b"marker".to_vec())]);
    // Nothing more has come in meanwhile.
    seen.drain(&mut a_events);
    assert!(seen.saw(b_peer, topic));
    assert!(!seen.saw(s_peer, topic), "{:?}", seen.subscribed);
}

#[tokio::test]
async fn a_stranger_subscribed_before_the_topic_was_registered_is_cut_off() {
    let port = 1_500_000 + u64::from(std::process::id() % 1000) * 10;
    let (topic, control) = ("conversation", "control");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (a, mut a_events, a_peer) = memory_node(port, None);
    for t in [topic, control] {
        a.send(NetCommand::Subscribe(t.into())).await.unwrap();
    }
    let (b, mut b_events, b_peer) = memory_node(port + 1, Some((port, a_peer)));
    let (s, mut s_events, s_peer) = memory_node(port + 2, Some((port, a_peer)));
    b.send(NetCommand::Subscribe(topic.into())).await.unwrap();
    for t in [topic, control] {
        s.send(NetCommand::Subscribe(t.into())).await.unwrap();
    }
    // Not registered yet: the stranger's subscription is taken.
    let mut seen = Seen::default();
    let (mut b_in, mut s_in, mut s_ctl) = (false, false, false);
    seen.until(&mut a_events, deadline, |ev| {
        b_in |= is_subscribed(ev, b_peer, topic);
        s_in |= is_subscribed(ev, s_peer, topic);
        s_ctl |= is_subscribed(ev, s_peer, control);
        b_in && s_in && s_ctl
    })
    .await;

    a.send(NetCommand::TopicMembers {
        topic: topic.into(),
        peers: vec![b_peer],
    })
    .await
    .unwrap();
    seen.until(
        &mut a_events,
        deadline,
        |ev| matches!(ev, NetEvent::Disconnected { peer } if *peer == s_peer),
    )
    .await;
    // The stranger redials on its own; its subscriptions come again
    // with the new connection, in one message: the control topic is
    // taken, the gated one is not.
    seen.subscribed.clear();
    seen.until(&mut a_events, deadline, |ev| {
        is_subscribed(ev, s_peer, control)
    })
    .await;
    assert!(!seen.saw(s_peer, topic), "{:?}", seen.subscribed);

    let got = publish_and_watch(&a, &mut b_events, &mut s_events, topic, control, deadline).await;
    assert_eq!(got, vec![(control.to_string(), b"marker".to_vec())]);
    seen.drain(&mut a_events);
    assert!(!seen.saw(s_peer, topic), "{:?}", seen.subscribed);
}

#[tokio::test]
async fn two_memory_nodes_exchange_gossip_and_direct() {
    let a_key = libp2p::identity::Keypair::generate_ed25519();
    let b_key = libp2p::identity::Keypair::generate_ed25519();
    let a_peer = a_key.public().to_peer_id();
    let port = 1_000_000 + u64::from(std::process::id() % 1000);
    let (a, mut a_events, _) = spawn(a_key, NetConfig::memory(port)).unwrap();
    let mut b_config = NetConfig::memory(port + 1);
    b_config.bootstrap = vec![format!("/memory/{port}/p2p/{a_peer}").parse().unwrap()];
    let (b, mut b_events, _) = spawn(b_key, b_config).unwrap();
    a.send(NetCommand::Subscribe("t".into())).await.unwrap();
    b.send(NetCommand::Subscribe("t".into())).await.unwrap();
    // Wait until a knows b is subscribed, then publish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = next_event(&mut a_events, deadline).await;
        if matches!(ev, NetEvent::Subscribed { .. }) {
            break;
        }
    }
    a.send(NetCommand::Publish {
        topic: "t".into(),
        data: b"hello".to_vec(),
    })
    .await
    .unwrap();
    loop {
        let ev = next_event(&mut b_events, deadline).await;
        if let NetEvent::Gossip { data, .. } = ev {
            assert_eq!(data, b"hello");
            break;
        }
    }
    let (tx, rx) = oneshot::channel();
    b.send(NetCommand::Direct {
        peer: a_peer,
        data: b"ping".to_vec(),
        reply: tx,
    })
    .await
    .unwrap();
    loop {
        let ev = next_event(&mut a_events, deadline).await;
        if let NetEvent::Direct { data, reply, .. } = ev {
            assert_eq!(data, b"ping");
            reply.send(b"pong".to_vec()).unwrap();
            break;
        }
    }
    assert_eq!(rx.await.unwrap().unwrap(), b"pong");
}
