//! The libp2p side of the network task: the composed [`Behaviour`]
//! (gossipsub behind the topic gate, Kademlia, identify, ping, the direct
//! and mailbox request-response protocols, the circuit relay client and
//! DCUtR), its settings, and the swarm built around it on the configured
//! transport.

use std::time::Duration;

use libp2p::gossipsub::{self, MessageId};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, connection_limits, dcutr, identify, kad, memory_connection_limits, ping,
    relay,
};
use weft_proto::transport::{SwarmConfig, build_swarm_with_relay_client};

use super::config::NetConfig;
use super::offenders::BannedAddresses;
use super::{
    DIRECT_PROTOCOL, DirectCodec, IDENTIFY_PROTOCOL, KAD_PROTOCOL, MAX_TOPICS_PER_PEER, NetError,
};
use super::{address_gate, gate, scoring};
use crate::crypto::envelope::MAX_ENVELOPE_BYTES;

/// Concurrent inbound requests per connection and protocol: each may
/// carry up to 8 MiB (`MAX_DIRECT_REQUEST`), so this bounds what one
/// connection can make the node hold at once.
const DIRECT_STREAMS: usize = 32;
const MAILBOX_STREAMS: usize = 16;

/// Gossip messages waiting to be sent to one peer (gossipsub's per-peer
/// send queue, shared by its connections; 5,000 by default). A peer that
/// stops reading has this many queued for it and no more: each up to
/// `max_transmit_size` (about 1 MiB), a text's envelope about 1 KiB.
/// Past it, what we publish or forward is dropped for that peer (the
/// outbox offers it again directly), and after as many drops again the
/// network task closes its connections (`events`, a slow peer).
pub(super) const GOSSIP_QUEUE: usize = 512;

/// Everything the swarm speaks, composed.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// First, so that a connection past a limit is refused before the
    /// other behaviours hear of it.
    pub(super) limits: connection_limits::Behaviour,
    /// Incoming connections from banned addresses and past the
    /// per-address cap, refused before their handshake.
    pub(super) addresses: address_gate::AddressGate,
    pub(super) memory: Toggle<memory_connection_limits::Behaviour>,
    /// Gossipsub behind the per-topic membership gate.
    pub(super) gossipsub: gate::Gossip,
    pub(super) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) direct: request_response::Behaviour<DirectCodec>,
    pub(super) mailbox: request_response::Behaviour<DirectCodec>,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) dcutr: dcutr::Behaviour,
}

fn gossipsub_config() -> Result<gossipsub::Config, NetError> {
    gossipsub::ConfigBuilder::default()
        // The envelope is signed by its sender device; gossipsub signing
        // would sign again per hop and expose the author's peer id.
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        // Content-addressed ids: with anonymous messages anything else
        // would make every message collide.
        .message_id_fn(|m: &gossipsub::Message| {
            MessageId::from(&blake3::hash(&m.data).as_bytes()[..20])
        })
        .validate_messages()
        .max_transmit_size(MAX_ENVELOPE_BYTES + 16 * 1024)
        .heartbeat_interval(Duration::from_millis(700))
        .connection_handler_queue_len(GOSSIP_QUEUE)
        .build()
        .map_err(NetError::GossipsubConfig)
}

/// Gossipsub behind the topic gate: built before the swarm, as the only
/// part of the behaviour that can fail.
fn gossipsub() -> Result<gate::Gossip, NetError> {
    let mut gossip = gate::Gossip::new(
        gossipsub::MessageAuthenticity::Anonymous,
        gossipsub_config()?,
        MAX_TOPICS_PER_PEER,
        MAX_TOPICS_PER_PEER,
    )
    .map_err(NetError::Gossipsub)?;
    gossip
        .with_peer_score(scoring::params(), scoring::thresholds())
        .map_err(NetError::PeerScore)?;
    Ok(gossip)
}

fn build_behaviour(
    key: &libp2p::identity::Keypair,
    gossipsub: gate::Gossip,
    relay_client: relay::client::Behaviour,
    config: &NetConfig,
    banned: BannedAddresses,
) -> Behaviour {
    let peer_id = key.public().to_peer_id();
    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_config.set_query_timeout(Duration::from_secs(30));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
    kad.set_mode(Some(if config.dht_server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(format!("weft/{}", env!("CARGO_PKG_VERSION"))),
    );
    let direct = request_response::Behaviour::with_codec(
        DirectCodec,
        [(StreamProtocol::new(DIRECT_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(30))
            .with_max_concurrent_streams(DIRECT_STREAMS),
    );
    // Same framing as the direct protocol; relays answer, and a relay may
    // ask a connected device to fetch (a wakeup).
    let mailbox = request_response::Behaviour::with_codec(
        DirectCodec,
        [(
            StreamProtocol::new(crate::mailbox::MAILBOX_PROTOCOL),
            ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(30))
            .with_max_concurrent_streams(MAILBOX_STREAMS),
    );
    let l = &config.limits;
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(l.max_pending_incoming))
            .with_max_pending_outgoing(Some(l.max_pending_outgoing))
            .with_max_established_incoming(Some(l.max_established_incoming))
            .with_max_established_outgoing(Some(l.max_established_outgoing))
            .with_max_established_per_peer(Some(l.max_established_per_peer)),
    );
    let memory = (l.max_memory_bytes > 0)
        .then(|| memory_connection_limits::Behaviour::with_max_bytes(l.max_memory_bytes));
    Behaviour {
        limits,
        addresses: address_gate::AddressGate::new(l, banned),
        memory: memory.into(),
        gossipsub,
        kad,
        identify,
        // A connection whose pings fail is closed (below): a network that
        // went away silently is noticed in about 15 s, not when TCP gives up
        // retransmitting (~15 minutes), and redialing can start.
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(10)),
        ),
        direct,
        mailbox,
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
    }
}

/// The swarm of `key` on the transport `config` names, with the relay
/// client (the builder is shared with the relay: `weft_proto::transport`);
/// it refuses connections from the addresses `banned` holds.
pub(super) fn build_swarm(
    key: libp2p::identity::Keypair,
    config: &NetConfig,
    banned: BannedAddresses,
) -> Result<Swarm<Behaviour>, NetError> {
    let gossipsub = gossipsub()?;
    let swarm_config = SwarmConfig {
        transport: config.transport.clone(),
        idle_connection_timeout: config.idle_timeout,
        bandwidth_metrics: None,
    };
    build_swarm_with_relay_client(key, swarm_config, |key, relay_client| {
        build_behaviour(key, gossipsub, relay_client, config, banned)
    })
    .map_err(NetError::from)
}
