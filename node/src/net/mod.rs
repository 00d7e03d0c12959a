//! The network task: owns the libp2p swarm (TCP/QUIC or an in-memory
//! transport, noise, yamux, identify, ping, gossipsub, Kademlia, the
//! direct request-response protocol, the circuit relay v2 client and
//! DCUtR) and LAN discovery through mdns-sd.
//!
//! It knows nothing of conversations or crypto: the node task tells it
//! what to publish, send and dial through a [`NetHandle`], and it reports
//! what arrives as [`NetEvent`]s on a bounded channel. Gossip validation
//! is the node's: messages wait in gossipsub's cache until the node
//! reports accept, ignore or reject. Who gets a topic's gossip is the
//! node's to say too: it names the peers allowed on each of its topics
//! ([`NetCommand::TopicMembers`]), and no other peer may subscribe there
//! (see `gate`). Known peers (bootstrap, discovered, asked for) are
//! redialed while disconnected, with jittered exponential backoff.
//!
//! Circuit relays: the relay client transport is composed with the
//! node's own, so circuit addresses
//! (`<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>`) can be dialed like
//! any other; and the node listens through every configured relay once it
//! is connected to it (see `relay_client`), so that it is reachable there
//! whether or not it is directly. Over a relayed connection DCUtR tries to
//! punch a hole to a direct one; the relayed connection stays either way.
//!
//! Layout: [`NetConfig`] (`config`); the composed libp2p behaviour and
//! the swarm built around it (`behaviour`); the task, its run loop and
//! the node's commands (`task`); what the swarm reports (`events`); the
//! peers the task keeps and redials (`peers`), strikes and bans by peer
//! id and address (`offenders`), refusing incoming connections by address
//! (`address_gate`); the topic
//! gate (`gate`), LAN discovery (`mdns`), listening through relays
//! (`relay_client`) and finding relays in the DHT (`relay_discovery`).

mod address_gate;
mod behaviour;
mod config;
mod events;
mod gate;
mod mdns;
mod offenders;
mod peers;
mod relay_client;
mod relay_discovery;
mod scoring;
mod task;

pub use config::{ConnectionLimits, NetConfig, TransportKind};
pub use gate::{MAX_GATED_MEMBERS, MAX_GATED_TOPICS, MAX_MEMBERS_PER_TOPIC, MAX_PENDING_CLOSES};
pub use offenders::{BAN_DURATION, IP_BANS, MAX_STRIKES};
pub use relay_discovery::{HOP_PROTOCOL, RELAY_PROVIDER_KEY};
pub use task::spawn;

use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

pub use libp2p::multiaddr::Protocol as AddrProtocol;
pub use weft_proto::net::{
    DIRECT_PROTOCOL, DirectCodec, IDENTIFY_PROTOCOL, KAD_PROTOCOL, MAX_DIRECT_REQUEST,
    MAX_DIRECT_RESPONSE, MDNS_SERVICE,
};

/// Most topics a peer may subscribe to: a person is in many conversations
/// (gossipsub's default filter stops at 100).
pub const MAX_TOPICS_PER_PEER: usize = 10_000;
/// Bounds of the channels between the node and network tasks.
pub const COMMAND_CAPACITY: usize = 8192;
pub const EVENT_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("bad listen address {0}: {1}")]
    Listen(Multiaddr, #[source] libp2p::TransportError<std::io::Error>),
    #[error("transport setup failed: {0}")]
    Transport(#[from] weft_proto::transport::SwarmBuildError),
    #[error("gossipsub config: {0}")]
    GossipsubConfig(#[source] libp2p::gossipsub::ConfigBuilderError),
    #[error("gossipsub: {0}")]
    Gossipsub(&'static str),
    #[error("gossipsub peer scoring: {0}")]
    PeerScore(String),
    #[error("direct request failed: {0}")]
    Direct(#[source] libp2p::request_response::OutboundFailure),
    #[error("the network task has stopped")]
    Stopped,
    #[error("mDNS failed: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// How a connected peer was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerSource {
    Mdns,
    Dht,
    Relay,
    Manual,
    Inbound,
}

impl PeerSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Mdns => "mdns",
            Self::Dht => "dht",
            Self::Relay => "relay",
            Self::Manual => "manual",
            Self::Inbound => "inbound",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConnectedPeer {
    pub peer_id: PeerId,
    pub source: PeerSource,
    pub addrs: Vec<Multiaddr>,
}

#[derive(Clone, Debug, Default)]
pub struct NetStatus {
    /// Where the node listens, without its own `/p2p/` suffix: direct
    /// addresses first, then circuit addresses through relays
    /// (`<relay addr>/p2p/<relay>/p2p-circuit`).
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<ConnectedPeer>,
}

/// What the node asks of the network.
#[derive(Debug)]
pub enum NetCommand {
    Subscribe(String),
    Unsubscribe(String),
    /// Replaces the peers (member devices) allowed to subscribe to
    /// `topic`, and so to receive what we publish or forward on it;
    /// empty: nobody. From the first of these the topic is gated, and it
    /// stays so after `Unsubscribe`. A connected peer subscribed to it and
    /// not allowed now has its connections closed. Topics never named here
    /// are open to any peer. Bounds: [`MAX_GATED_TOPICS`] (the oldest is
    /// forgotten, i.e. open again), [`MAX_MEMBERS_PER_TOPIC`],
    /// [`MAX_GATED_MEMBERS`].
    TopicMembers {
        topic: String,
        peers: Vec<PeerId>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
    },
    Validation {
        message_id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    },
    Direct {
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    /// A mailbox request to a relay (`/weft/mailbox/1`).
    Mailbox {
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        source: PeerSource,
    },
    /// The peer sent something invalid (a rejected envelope, a malformed
    /// request). Enough strikes and it is disconnected and banned.
    Penalize {
        peer: PeerId,
        reason: &'static str,
    },
    Status(oneshot::Sender<NetStatus>),
    Shutdown(oneshot::Sender<()>),
}

/// What the network reports to the node.
#[derive(Debug)]
pub enum NetEvent {
    Gossip {
        message_id: MessageId,
        source: PeerId,
        topic: String,
        data: Vec<u8>,
    },
    Direct {
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<Vec<u8>>,
    },
    Connected {
        peer: PeerId,
        addr: Multiaddr,
    },
    Disconnected {
        peer: PeerId,
    },
    Subscribed {
        peer: PeerId,
        topic: String,
    },
    Unsubscribed {
        peer: PeerId,
        topic: String,
    },
    /// A relay says mail is waiting in our mailbox there.
    MailWaiting {
        relay: PeerId,
    },
    Listening {
        addr: Multiaddr,
    },
    /// A relay found through the DHT (and confirmed by what it speaks) is
    /// now used like a configured one: `addr` ends with `/p2p/<relay>`.
    RelayFound {
        relay: PeerId,
        addr: Multiaddr,
    },
    /// A connected peer's listen addresses (circuit ones included), each
    /// ending with `/p2p/<peer>`, as it announced them (at most 16).
    PeerAddrs {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
}

/// A cloneable handle to the network task.
#[derive(Clone, Debug)]
pub struct NetHandle {
    tx: mpsc::Sender<NetCommand>,
    peer_id: PeerId,
}

impl NetHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Queues a command without waiting: the node task must never block on
    /// the network task. `false` if the queue is full or the task gone.
    pub fn try_send(&self, cmd: NetCommand) -> bool {
        self.tx.try_send(cmd).is_ok()
    }

    pub async fn send(&self, cmd: NetCommand) -> Result<(), NetError> {
        self.tx.send(cmd).await.map_err(|_| NetError::Stopped)
    }

    pub async fn status(&self) -> Result<NetStatus, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(NetCommand::Status(tx)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(NetCommand::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}
