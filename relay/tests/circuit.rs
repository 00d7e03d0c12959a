//! Circuit relay v2 through a weft-relay, in-process on the memory
//! transport: a device reserves a slot, another reaches it through the
//! relay's circuit address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, ping, relay};
use weft_proto::transport::{SwarmConfig, TransportKind, build_swarm_with_relay_client};
use weft_relay::{Config, Relay};

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(NetworkBehaviour)]
struct Device {
    relay: relay::client::Behaviour,
    ping: ping::Behaviour,
}

fn device() -> Swarm<Device> {
    let config = SwarmConfig {
        transport: TransportKind::Memory,
        idle_connection_timeout: Duration::from_secs(60),
        bandwidth_metrics: None,
    };
    build_swarm_with_relay_client(Keypair::generate_ed25519(), config, |_, relay| Device {
        relay,
        ping: ping::Behaviour::default(),
    })
    .unwrap()
}

/// Polls both swarms until `done` says so about an event of `a` or `b`.
async fn until(
    a: &mut Swarm<Device>,
    b: &mut Swarm<Device>,
    mut done: impl FnMut(char, &SwarmEvent<DeviceEvent>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (side, event) = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                e = a.select_next_some() => ('a', e),
                e = b.select_next_some() => ('b', e),
            }
        })
        .await
        .expect("deadline passed");
        if done(side, &event) {
            return;
        }
    }
}

#[tokio::test]
async fn a_device_behind_the_relay_is_reached_through_a_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let port = 4_000_000 + u64::from(std::process::id() % 10_000) * 10;
    let config = Config {
        listen: vec![format!("/memory/{port}")],
        metrics: "off".into(),
        ..Config::default()
    };
    let relay = Relay::start(&config, dir.path()).await.unwrap();
    let relay_addr: Multiaddr = relay.listen()[0]
        .clone()
        .with(Protocol::P2p(relay.peer_id()));

    let mut listener = device();
    let mut dialer = device();
    let listener_id: PeerId = *listener.local_peer_id();
    listener
        .listen_on(relay_addr.clone().with(Protocol::P2pCircuit))
        .unwrap();
    let mut reserved = false;
    let mut circuit_addr = None;
    until(&mut listener, &mut dialer, |side, e| {
        if side == 'a' {
            match e {
                SwarmEvent::Behaviour(DeviceEvent::Relay(
                    relay::client::Event::ReservationReqAccepted { .. },
                )) => reserved = true,
                SwarmEvent::NewListenAddr { address, .. }
                    if address.iter().any(|p| p == Protocol::P2pCircuit) =>
                {
                    circuit_addr = Some(address.clone());
                }
                _ => {}
            }
        }
        reserved && circuit_addr.is_some()
    })
    .await;
    let circuit_addr = circuit_addr.unwrap();
    assert!(
        circuit_addr
            .to_string()
            .contains(&relay.peer_id().to_string())
    );

    dialer
        .dial(
            relay_addr
                .with(Protocol::P2pCircuit)
                .with(Protocol::P2p(listener_id)),
        )
        .unwrap();
    let dialer_id = *dialer.local_peer_id();
    let (mut at_listener, mut at_dialer) = (false, false);
    until(&mut listener, &mut dialer, |side, e| {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = e {
            if side == 'a' && *peer_id == dialer_id {
                at_listener = true;
            }
            if side == 'b' && *peer_id == listener_id {
                at_dialer = true;
            }
        }
        at_listener && at_dialer
    })
    .await;
    relay.shutdown().await;
}
