//! The libp2p swarm the node and the relay both run: TCP (without Nagle's
//! delay) and QUIC over the network, or libp2p's memory transport in
//! tests, each connection secured with noise and multiplexed with yamux;
//! the node adds the circuit relay client, the relay counts bandwidth.
//! The simulator's kind carries memory-like connections through its link
//! model (`sim_transport`).
//!
//! Building a swarm does no I/O: the swarm returned listens and dials
//! only when its owner asks and polls it.
//!
//! The swarm is assembled as libp2p 0.57's `SwarmBuilder` assembles it
//! (`with_tcp`, `with_quic`, `with_other_transport`, `with_relay_client`,
//! `with_bandwidth_metrics`, `build`), from the same public parts, so that
//! one function covers both transports and both optional layers: the
//! builder gives each combination its own type.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::timeout::TransportTimeout;
use libp2p::core::transport::{Boxed, MemoryTransport, Transport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::metrics::{BandwidthTransport, Registry};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{PeerId, Swarm, noise, quic, relay, tcp, yamux};

use crate::sim_transport::SimNetwork;

/// How a swarm reaches its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP and QUIC over the OS network stack.
    Network,
    /// libp2p's in-process memory transport: many nodes in one process
    /// (tests, simulations). Listen on `/memory/N`.
    Memory,
    /// The simulator's network: like [`TransportKind::Memory`]
    /// (`/memory/N`), with each link's delay, bandwidth and failures.
    Simulated(SimNetwork),
}

/// What the node's and the relay's swarms may differ in, besides their
/// behaviour and the relay client.
#[derive(Debug)]
pub struct SwarmConfig<'a> {
    pub transport: TransportKind,
    /// How long a connection that no protocol uses is kept open.
    pub idle_connection_timeout: Duration,
    /// Counts the bytes of each connection, by direction and protocol
    /// stack, in this registry (the relay's metrics).
    pub bandwidth_metrics: Option<&'a mut Registry>,
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmBuildError {
    #[error("noise: {0}")]
    Noise(#[from] noise::Error),
}

/// A dial or an inbound connection not secured and multiplexed in this
/// time fails (the `SwarmBuilder`'s default).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

type BoxedTransport = Boxed<(PeerId, StreamMuxerBox)>;

/// The swarm of `key` on `config`'s transport, with the behaviour
/// `behaviour` builds.
pub fn build_swarm<B: NetworkBehaviour>(
    key: Keypair,
    config: SwarmConfig<'_>,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> Result<Swarm<B>, SwarmBuildError> {
    let transport = base_transport(&key, &config.transport)?;
    let behaviour = behaviour(&key);
    Ok(finish(key, transport, config, behaviour))
}

/// [`build_swarm`] with the circuit relay v2 client: `behaviour` is given
/// its behaviour, and the swarm can listen and dial through relays
/// (`.../p2p-circuit` addresses).
pub fn build_swarm_with_relay_client<B: NetworkBehaviour>(
    key: Keypair,
    config: SwarmConfig<'_>,
    behaviour: impl FnOnce(&Keypair, relay::client::Behaviour) -> B,
) -> Result<Swarm<B>, SwarmBuildError> {
    let (relayed, relay_client) = relay::client::new(key.public().to_peer_id());
    let relayed = relayed
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(&key)?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let transport = relayed
        .or_transport(base_transport(&key, &config.transport)?)
        .map(|either, _| either.into_inner())
        .boxed();
    let behaviour = behaviour(&key, relay_client);
    Ok(finish(key, transport, config, behaviour))
}

/// The transports of `kind`, secured and multiplexed.
fn base_transport(key: &Keypair, kind: &TransportKind) -> Result<BoxedTransport, noise::Error> {
    Ok(match kind {
        TransportKind::Network => {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            // QUIC secures and multiplexes on its own (TLS 1.3, streams).
            let quic = quic::tokio::Transport::new(quic::Config::new(key))
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            tcp.or_transport(quic)
                .map(|either, _| either.into_inner())
                .boxed()
        }
        TransportKind::Memory => MemoryTransport::default()
            .upgrade(Version::V1)
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        TransportKind::Simulated(net) => net
            .transport()
            .upgrade(Version::V1)
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    })
}

/// The swarm around `transport` (counted if asked) and `behaviour`.
fn finish<B: NetworkBehaviour>(
    key: Keypair,
    transport: BoxedTransport,
    config: SwarmConfig<'_>,
    behaviour: B,
) -> Swarm<B> {
    let transport = match config.bandwidth_metrics {
        Some(registry) => BandwidthTransport::new(transport, registry)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => transport,
    };
    Swarm::new(
        TransportTimeout::new(transport, CONNECTION_TIMEOUT).boxed(),
        behaviour,
        key.public().to_peer_id(),
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(config.idle_connection_timeout),
    )
}

#[cfg(test)]
mod tests {
    use libp2p::Multiaddr;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::dummy;

    use super::*;

    fn config(transport: TransportKind) -> SwarmConfig<'static> {
        SwarmConfig {
            transport,
            idle_connection_timeout: Duration::from_secs(60),
            bandwidth_metrics: None,
        }
    }

    #[tokio::test]
    async fn each_transport_listens_only_on_its_own_addresses() {
        let memory: Multiaddr = Multiaddr::empty().with(Protocol::Memory(0));
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();

        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let mut swarm =
            build_swarm(key, config(TransportKind::Memory), |_| dummy::Behaviour).unwrap();
        assert_eq!(*swarm.local_peer_id(), peer);
        assert!(swarm.listen_on(memory.clone()).is_ok());
        assert!(swarm.listen_on(tcp.clone()).is_err());

        let key = Keypair::generate_ed25519();
        let mut swarm =
            build_swarm(key, config(TransportKind::Network), |_| dummy::Behaviour).unwrap();
        assert!(swarm.listen_on(tcp).is_ok());
        assert!(swarm.listen_on(quic).is_ok());
        assert!(swarm.listen_on(memory).is_err());
    }

    #[tokio::test]
    async fn bandwidth_is_counted_in_the_registry_given() {
        let mut registry = Registry::default();
        let counted = SwarmConfig {
            bandwidth_metrics: Some(&mut registry),
            ..config(TransportKind::Network)
        };
        let key = Keypair::generate_ed25519();
        let mut swarm = build_swarm(key, counted, |_| dummy::Behaviour).unwrap();
        // A connection is counted from its dial on (never polled here:
        // nothing is sent).
        swarm
            .dial("/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().unwrap())
            .unwrap();
        let mut metrics = String::new();
        prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
        assert!(metrics.contains("libp2p_bandwidth"), "{metrics}");
    }

    #[tokio::test]
    async fn the_relay_client_accepts_circuit_addresses() {
        let relay = Keypair::generate_ed25519().public().to_peer_id();
        // A relay on another transport than the swarm's own.
        let circuit: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        let key = Keypair::generate_ed25519();
        let mut swarm =
            build_swarm_with_relay_client(key, config(TransportKind::Memory), |_, relay| relay)
                .unwrap();
        assert!(swarm.listen_on(circuit.clone()).is_ok());

        let key = Keypair::generate_ed25519();
        let mut swarm =
            build_swarm(key, config(TransportKind::Memory), |_| dummy::Behaviour).unwrap();
        assert!(swarm.listen_on(circuit).is_err());
    }
}
