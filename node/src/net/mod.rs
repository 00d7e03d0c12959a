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

mod gate;
mod mdns;
mod relay_client;
mod relay_discovery;

pub use gate::{MAX_GATED_MEMBERS, MAX_GATED_TOPICS, MAX_MEMBERS_PER_TOPIC, MAX_PENDING_CLOSES};
pub use relay_discovery::{HOP_PROTOCOL, RELAY_PROVIDER_KEY};

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, dcutr, identify, kad, noise, ping, relay, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};

pub use libp2p::multiaddr::Protocol as AddrProtocol;
pub use weft_proto::net::{
    DIRECT_PROTOCOL, DirectCodec, IDENTIFY_PROTOCOL, KAD_PROTOCOL, MAX_DIRECT_REQUEST,
    MAX_DIRECT_RESPONSE, MDNS_SERVICE,
};

use crate::crypto::envelope::MAX_ENVELOPE_BYTES;

/// Most topics a peer may subscribe to: a person is in many conversations
/// (gossipsub's default filter stops at 100).
pub const MAX_TOPICS_PER_PEER: usize = 10_000;
/// Bounds of the channels between the node and network tasks.
pub const COMMAND_CAPACITY: usize = 8192;
pub const EVENT_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("bad listen address {0}: {1}")]
    Listen(Multiaddr, String),
    #[error("transport setup failed: {0}")]
    Transport(String),
    #[error("direct request failed: {0}")]
    Direct(String),
    #[error("the network task has stopped")]
    Stopped,
    #[error("mDNS failed: {0}")]
    Mdns(String),
}

/// How the swarm reaches other nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP and QUIC over the OS network stack.
    Network,
    /// libp2p's in-process memory transport: many nodes in one process
    /// (tests, simulations). Listen on `/memory/N`.
    Memory,
}

/// Network settings of a node.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and keep dialing (multiaddrs with /p2p/).
    pub bootstrap: Vec<Multiaddr>,
    /// Relays (multiaddrs with /p2p/): kept connected like bootstrap peers;
    /// the node keeps a mailbox at each and, once connected, listens
    /// through each (circuit relay v2), so that it is reachable at
    /// `<relay addr>/p2p-circuit/p2p/<node>`.
    pub relays: Vec<Multiaddr>,
    /// Relays to use in all: while fewer are in use (configured ones
    /// count), the node looks for more in the DHT, where relays announce
    /// themselves. 0: none are looked for.
    pub relay_target: usize,
    /// Advertise and browse `_weft._udp.local.` with mdns-sd.
    pub mdns: bool,
    pub transport: TransportKind,
    /// Kademlia in server mode (answers queries): for reachable nodes.
    pub dht_server: bool,
    pub idle_timeout: Duration,
    /// First wait before redialing a known peer after a failed dial or a
    /// lost connection; it doubles with each failure.
    pub redial_base: Duration,
    /// Longest wait between redials of a known peer (before jitter).
    pub redial_max: Duration,
}

impl NetConfig {
    pub fn new(listen: Vec<Multiaddr>) -> Self {
        Self {
            listen,
            bootstrap: Vec::new(),
            relays: Vec::new(),
            relay_target: 2,
            mdns: false,
            transport: TransportKind::Network,
            dht_server: true,
            idle_timeout: Duration::from_secs(3600),
            redial_base: Duration::from_secs(1),
            redial_max: Duration::from_secs(30),
        }
    }

    /// One TCP listener on 127.0.0.1 with an OS-chosen port.
    pub fn loopback() -> Self {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/0"
            .parse()
            .unwrap_or_else(|_| Multiaddr::empty());
        Self::new(vec![addr])
    }

    /// The in-memory transport on `/memory/{port}`.
    pub fn memory(port: u64) -> Self {
        let mut c = Self::new(vec![Multiaddr::empty().with(Protocol::Memory(port))]);
        c.transport = TransportKind::Memory;
        c
    }
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

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Gossipsub behind the per-topic membership gate.
    gossipsub: gate::Gossip,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    direct: request_response::Behaviour<DirectCodec>,
    mailbox: request_response::Behaviour<DirectCodec>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
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
        .build()
        .map_err(|e| NetError::Transport(format!("gossipsub config: {e}")))
}

fn build_behaviour(
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
    config: &NetConfig,
) -> Result<Behaviour, NetError> {
    let peer_id = key.public().to_peer_id();
    let gossipsub = gate::Gossip::new(
        gossipsub::MessageAuthenticity::Anonymous,
        gossipsub_config()?,
        MAX_TOPICS_PER_PEER,
        MAX_TOPICS_PER_PEER,
    )
    .map_err(|e| NetError::Transport(e.to_string()))?;
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
            .with_max_concurrent_streams(256),
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
            .with_max_concurrent_streams(64),
    );
    Ok(Behaviour {
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
    })
}

/// The wait before redialing a peer after `attempts` earlier failures:
/// `min(base * 2^attempts, max)`, scaled by `jitter` (in [0.5, 1.5), so
/// peers that failed together do not all redial together).
fn redial_delay(base: Duration, max: Duration, attempts: u32, jitter: f64) -> Duration {
    let factor = 1u32.checked_shl(attempts).unwrap_or(u32::MAX);
    let capped = base.saturating_mul(factor).min(max);
    Duration::try_from_secs_f64(capped.as_secs_f64() * jitter.clamp(0.5, 1.5)).unwrap_or(max)
}

/// `addr` ending with `/p2p/<peer>` (added if missing; `None` if it names
/// another peer).
fn with_peer(mut addr: Multiaddr, peer: PeerId) -> Option<Multiaddr> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => Some(addr),
        Some(Protocol::P2p(_)) => None,
        _ => {
            addr.push(Protocol::P2p(peer));
            Some(addr)
        }
    }
}

/// A random factor in [0.5, 1.5) for [`redial_delay`].
fn jitter() -> f64 {
    let sample = getrandom::u32().unwrap_or(u32::MAX / 2);
    0.5 + f64::from(sample) / (f64::from(u32::MAX) + 1.0)
}

/// Now plus `delay`, or plus a day if a huge `redial_max` would overflow
/// the clock.
fn after(delay: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(delay)
        .unwrap_or(now + Duration::from_secs(86_400))
}

fn boxed(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

fn build_swarm(
    key: libp2p::identity::Keypair,
    config: &NetConfig,
) -> Result<Swarm<Behaviour>, NetError> {
    let idle = config.idle_timeout;
    let err = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    match config.transport {
        TransportKind::Network => Ok(libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| err(&e))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| err(&e))?
            .with_behaviour(|key, relay| build_behaviour(key, relay, config).map_err(boxed))
            .map_err(|e| err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build()),
        TransportKind::Memory => Ok(libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                use libp2p::core::transport::Transport as _;
                use libp2p::core::upgrade::Version;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    libp2p::core::transport::MemoryTransport::default()
                        .upgrade(Version::V1)
                        .authenticate(noise::Config::new(key).map_err(boxed)?)
                        .multiplex(yamux::Config::default()),
                )
            })
            .map_err(|e| err(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| err(&e))?
            .with_behaviour(|key, relay| build_behaviour(key, relay, config).map_err(boxed))
            .map_err(|e| err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build()),
    }
}

/// Starts the network task. Returns its handle and the receiving end of
/// its events.
pub fn spawn(
    key: libp2p::identity::Keypair,
    config: NetConfig,
) -> Result<
    (
        NetHandle,
        mpsc::Receiver<NetEvent>,
        tokio::task::JoinHandle<()>,
    ),
    NetError,
> {
    let peer_id = key.public().to_peer_id();
    let mut swarm = build_swarm(key, &config)?;
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen(addr.clone(), e.to_string()))?;
        listeners.push(id);
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
    let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
    let handle = NetHandle {
        tx: cmd_tx.clone(),
        peer_id,
    };
    let relay_listeners =
        relay_client::RelayListeners::new(&config.relays, tokio::time::Instant::now());
    let relay_discovery =
        relay_discovery::RelayDiscovery::new(config.relay_target, relay_listeners.relays());
    let task = NetworkTask {
        swarm,
        relay_listeners,
        relay_discovery,
        commands: cmd_rx,
        events: event_tx,
        self_commands: cmd_tx,
        config,
        listeners,
        peers: HashMap::new(),
        dial_sources: HashMap::new(),
        known_peers: HashMap::new(),
        pending_direct: HashMap::new(),
        pending_mailbox: HashMap::new(),
        pending_responses: FuturesUnordered::new(),
        mdns: None,
        strikes: HashMap::new(),
        banned: HashMap::new(),
        kad_ready: false,
        dht_lookups: HashMap::new(),
    };
    let join = tokio::spawn(task.run());
    Ok((handle, event_rx, join))
}

type PendingResponse = std::pin::Pin<
    Box<dyn Future<Output = (Option<Vec<u8>>, request_response::ResponseChannel<Vec<u8>>)> + Send>,
>;

struct NetworkTask {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<NetCommand>,
    events: mpsc::Sender<NetEvent>,
    /// For the mDNS bridge, which feeds discoveries back as commands.
    self_commands: mpsc::Sender<NetCommand>,
    config: NetConfig,
    /// Closed on stop, so that a memory-transport port is free again.
    listeners: Vec<ListenerId>,
    peers: HashMap<PeerId, ConnectedPeer>,
    dial_sources: HashMap<PeerId, PeerSource>,
    /// Peers to keep connected to (bootstrap, discovered), bounded.
    known_peers: HashMap<PeerId, KnownPeer>,
    pending_direct: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, NetError>>>,
    pending_mailbox: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, NetError>>>,
    pending_responses: FuturesUnordered<PendingResponse>,
    mdns: Option<mdns::Mdns>,
    strikes: HashMap<PeerId, (u32, tokio::time::Instant)>,
    banned: HashMap<PeerId, tokio::time::Instant>,
    /// Whether the DHT routing table has anyone in it.
    kad_ready: bool,
    /// Peers being looked up in the DHT (bounded).
    dht_lookups: HashMap<kad::QueryId, PeerId>,
    /// The circuit listeners at the relays in use.
    relay_listeners: relay_client::RelayListeners,
    /// Relays looked for in the DHT.
    relay_discovery: relay_discovery::RelayDiscovery,
}

/// A peer the task keeps redialing while it is disconnected.
struct KnownPeer {
    addrs: Vec<Multiaddr>,
    source: PeerSource,
    /// Failed dials and lost connections since the last connection.
    attempts: u32,
    /// When the redial timer may dial the peer next.
    next_dial_at: tokio::time::Instant,
}

const MAX_KNOWN_PEERS: usize = 4096;
/// How often the redial timer looks for peers due a dial.
const REDIAL_TICK: Duration = Duration::from_millis(500);
/// Most dials the redial timer starts per tick.
const MAX_REDIALS_PER_TICK: usize = 64;
/// Strikes within [`STRIKE_WINDOW`] that get a peer banned.
pub const MAX_STRIKES: u32 = 16;
const STRIKE_WINDOW: Duration = Duration::from_secs(600);
/// How long a banned peer stays banned.
pub const BAN_DURATION: Duration = Duration::from_secs(3600);
/// Most concurrent DHT lookups of peers to dial.
const MAX_DHT_LOOKUPS: usize = 64;
/// How often the DHT routing table is refreshed.
const DHT_REFRESH: Duration = Duration::from_secs(300);
/// Most peers tracked for strikes and bans.
const MAX_TRACKED_OFFENDERS: usize = 4096;

impl NetworkTask {
    async fn run(mut self) {
        for addr in self.config.bootstrap.clone() {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                self.remember(peer, vec![addr], PeerSource::Manual);
                self.dial(peer, PeerSource::Manual);
            }
        }
        for addr in self.config.relays.clone() {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                self.remember(peer, vec![addr], PeerSource::Relay);
                self.dial(peer, PeerSource::Relay);
            }
        }
        let mut refresh = tokio::time::interval(DHT_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(REDIAL_TICK);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(NetCommand::Shutdown(done)) => {
                        self.stop();
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => {
                        self.stop();
                        return;
                    }
                },
                event = self.swarm.select_next_some() => {
                    if self.on_swarm_event(event).await.is_err() {
                        // The node is gone: nothing left to serve.
                        self.stop();
                        return;
                    }
                },
                Some((response, channel)) = self.pending_responses.next(), if !self.pending_responses.is_empty() => {
                    if let Some(response) = response {
                        let _ = self.swarm.behaviour_mut().direct.send_response(channel, response);
                    }
                },
                _ = refresh.tick() => {
                    if self.kad_ready {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                _ = redial.tick() => {
                    self.unban_expired();
                    self.redial();
                    self.listen_via_relays();
                    self.discover_relays();
                }
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mdns) = self.mdns.take() {
            mdns.stop();
        }
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        for id in self.relay_listeners.listeners() {
            self.swarm.remove_listener(id);
        }
    }

    /// Listens through each configured relay that is connected and has no
    /// circuit listener yet (its reservation there).
    fn listen_via_relays(&mut self) {
        let now = tokio::time::Instant::now();
        let swarm = &self.swarm;
        let due = self.relay_listeners.due(now, |p| swarm.is_connected(p));
        let (base, max) = (self.config.redial_base, self.config.redial_max);
        for (relay, circuit) in due {
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::debug!(%relay, "listening through relay at {circuit}");
                    self.relay_listeners.opened(&relay, id);
                }
                Err(e) => {
                    tracing::warn!(%relay, "cannot listen through relay at {circuit}: {e}");
                    self.relay_listeners
                        .failed(&relay, now, |n| redial_delay(base, max, n, jitter()));
                }
            }
        }
    }

    /// Asks the DHT for relays when more are wanted.
    fn discover_relays(&mut self) {
        let now = tokio::time::Instant::now();
        if self.relay_discovery.due(now, self.kad_ready) {
            let query = self
                .swarm
                .behaviour_mut()
                .kad
                .get_providers(relay_discovery::relay_key());
            self.relay_discovery.started(query);
        }
    }

    /// Uses a relay found through the DHT like a configured one.
    async fn adopt_relay(&mut self, relay: PeerId, addr: Multiaddr) -> Result<(), ()> {
        tracing::info!(%relay, "using relay {addr} found through the DHT");
        self.relay_listeners.add(&addr, tokio::time::Instant::now());
        self.remember(relay, vec![addr.clone()], PeerSource::Relay);
        self.listen_via_relays();
        self.emit(NetEvent::RelayFound { relay, addr }).await
    }

    fn remember(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, source: PeerSource) {
        if self.banned.contains_key(&peer)
            || (self.known_peers.len() >= MAX_KNOWN_PEERS && !self.known_peers.contains_key(&peer))
        {
            return;
        }
        let entry = self.known_peers.entry(peer).or_insert_with(|| KnownPeer {
            addrs: Vec::new(),
            source,
            attempts: 0,
            next_dial_at: tokio::time::Instant::now(),
        });
        for addr in addrs {
            if !entry.addrs.contains(&addr) {
                entry.addrs.push(addr);
            }
        }
        entry.addrs.truncate(16);
        for addr in entry.addrs.clone() {
            self.swarm.add_peer_address(peer, addr);
        }
    }

    fn dial(&mut self, peer: PeerId, source: PeerSource) {
        if peer == *self.swarm.local_peer_id()
            || self.swarm.is_connected(&peer)
            || self.banned.contains_key(&peer)
        {
            return;
        }
        let addrs = match self.known_peers.get_mut(&peer) {
            Some(known) => {
                // Not again from the timer until this dial fails (which
                // reschedules it) or, if it never reports, `redial_max`.
                known.next_dial_at = after(self.config.redial_max);
                known.addrs.clone()
            }
            None => Vec::new(),
        };
        if addrs.is_empty() && self.kad_ready && !self.dht_lookups.values().any(|p| *p == peer) {
            // No address known: ask the DHT where the peer is; the dial
            // follows when the lookup finds it.
            if self.dht_lookups.len() < MAX_DHT_LOOKUPS {
                let query = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.dht_lookups.insert(query, peer);
            }
            return;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .build();
        self.dial_sources.insert(peer, source);
        match self.swarm.dial(opts) {
            Ok(()) => {}
            // Already dialing: that dial's outcome reschedules the peer.
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => {
                tracing::debug!(%peer, "dial failed: {e}");
                self.back_off(peer);
            }
        }
    }

    /// After a failed dial or a lost connection: the timer dials the peer
    /// again after an exponentially growing, jittered wait.
    fn back_off(&mut self, peer: PeerId) {
        let (base, max) = (self.config.redial_base, self.config.redial_max);
        if let Some(known) = self.known_peers.get_mut(&peer) {
            known.next_dial_at = after(redial_delay(base, max, known.attempts, jitter()));
            known.attempts = known.attempts.saturating_add(1);
        }
    }

    /// The network may be back (an interface came up, a peer connected):
    /// dial every known disconnected peer on the next tick.
    fn reset_backoff(&mut self) {
        let now = tokio::time::Instant::now();
        for (peer, known) in &mut self.known_peers {
            if !self.swarm.is_connected(peer) {
                known.attempts = 0;
                known.next_dial_at = now;
            }
        }
    }

    fn penalize(&mut self, peer: PeerId, reason: &'static str) {
        let now = tokio::time::Instant::now();
        if self.strikes.len() >= MAX_TRACKED_OFFENDERS && !self.strikes.contains_key(&peer) {
            self.strikes
                .retain(|_, (_, since)| now.duration_since(*since) < STRIKE_WINDOW);
            if self.strikes.len() >= MAX_TRACKED_OFFENDERS {
                return;
            }
        }
        let entry = self.strikes.entry(peer).or_insert((0, now));
        if now.duration_since(entry.1) >= STRIKE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        tracing::debug!(%peer, strikes = entry.0, "penalised: {reason}");
        if entry.0 >= MAX_STRIKES {
            self.strikes.remove(&peer);
            self.ban(peer, reason);
        }
    }

    fn ban(&mut self, peer: PeerId, reason: &'static str) {
        tracing::warn!(%peer, "banned for {BAN_DURATION:?}: {reason}");
        if self.banned.len() >= MAX_TRACKED_OFFENDERS {
            return;
        }
        self.banned
            .insert(peer, tokio::time::Instant::now() + BAN_DURATION);
        self.known_peers.remove(&peer);
        let behaviour = self.swarm.behaviour_mut();
        behaviour.gossipsub.blacklist_peer(&peer);
        behaviour.kad.remove_peer(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn unban_expired(&mut self) {
        let now = tokio::time::Instant::now();
        let expired: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            self.banned.remove(&peer);
            self.swarm
                .behaviour_mut()
                .gossipsub
                .remove_blacklisted_peer(&peer);
        }
    }

    /// Dials the known disconnected peers whose backoff has run out, at
    /// most [`MAX_REDIALS_PER_TICK`] of them.
    fn redial(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<(PeerId, PeerSource)> = self
            .known_peers
            .iter()
            .filter(|(p, k)| k.next_dial_at <= now && !self.swarm.is_connected(p))
            .take(MAX_REDIALS_PER_TICK)
            .map(|(p, k)| (*p, k.source))
            .collect();
        // Each dial pushes its peer's `next_dial_at` on, so peers left over
        // come first on the next tick.
        for (peer, source) in due {
            self.dial(peer, source);
        }
    }

    fn on_command(&mut self, cmd: NetCommand) {
        let behaviour = self.swarm.behaviour_mut();
        match cmd {
            NetCommand::Subscribe(topic) => {
                if let Err(e) = behaviour.gossipsub.subscribe(&IdentTopic::new(topic)) {
                    tracing::warn!("subscribe failed: {e}");
                }
            }
            NetCommand::Unsubscribe(topic) => {
                behaviour.gossipsub.unsubscribe(&IdentTopic::new(topic));
            }
            NetCommand::TopicMembers { topic, peers } => {
                let topic = IdentTopic::new(topic).hash();
                for peer in behaviour.gossipsub.set_topic_members(topic, peers) {
                    // No room to queue it in the gate: cut it off here.
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            NetCommand::Publish { topic, data } => {
                match behaviour.gossipsub.publish(IdentTopic::new(topic), data) {
                    Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                    Err(gossipsub::PublishError::Duplicate) => {}
                    Err(e) => tracing::debug!("publish failed: {e}"),
                }
            }
            NetCommand::Validation {
                message_id,
                source,
                acceptance,
            } => {
                behaviour.gossipsub.report_message_validation_result(
                    &message_id,
                    &source,
                    acceptance,
                );
            }
            NetCommand::Direct { peer, data, reply } => {
                let id = behaviour.direct.send_request(&peer, data);
                self.pending_direct.insert(id, reply);
            }
            NetCommand::Mailbox { peer, data, reply } => {
                let id = behaviour.mailbox.send_request(&peer, data);
                self.pending_mailbox.insert(id, reply);
            }
            NetCommand::Dial {
                peer,
                addrs,
                source,
            } => {
                self.remember(peer, addrs, source);
                self.dial(peer, source);
            }
            NetCommand::Status(reply) => {
                let me = *self.swarm.local_peer_id();
                let status = NetStatus {
                    listen: relay_client::normalize_listen(self.swarm.listeners().cloned(), &me),
                    peers: self.peers.values().cloned().collect(),
                };
                let _ = reply.send(status);
            }
            NetCommand::Penalize { peer, reason } => self.penalize(peer, reason),
            NetCommand::Shutdown(_) => {}
        }
    }

    /// Handles one swarm event. `Err` when the node has gone away.
    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Result<(), ()> {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                let circuit = relay_client::is_circuit(&address);
                if self.config.mdns && self.mdns.is_none() && !circuit {
                    self.start_mdns(&address);
                }
                self.reset_backoff();
                let me = *self.swarm.local_peer_id();
                let addr = relay_client::normalize_listen([address], &me)
                    .pop()
                    .unwrap_or_else(Multiaddr::empty);
                self.emit(NetEvent::Listening { addr }).await?;
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let now = tokio::time::Instant::now();
                let (base, max) = (self.config.redial_base, self.config.redial_max);
                if let Some(relay) =
                    self.relay_listeners
                        .closed(listener_id, reason.is_err(), now, |n| {
                            redial_delay(base, max, n, jitter())
                        })
                {
                    match reason {
                        Ok(()) => tracing::info!(%relay, "no longer listening through relay"),
                        Err(e) => tracing::warn!(%relay, "listening through relay failed: {e}"),
                    }
                    // Connected still: listen again as soon as allowed.
                    self.listen_via_relays();
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if self.banned.contains_key(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return Ok(());
                }
                if let Some(known) = self.known_peers.get_mut(&peer_id) {
                    known.attempts = 0;
                }
                if num_established.get() == 1 {
                    self.reset_backoff();
                }
                let addr = endpoint.get_remote_address().clone();
                let source = if endpoint.is_dialer() {
                    // Dials we did not ask for come from the behaviours,
                    // i.e. Kademlia walking the DHT.
                    self.dial_sources
                        .remove(&peer_id)
                        .unwrap_or(PeerSource::Dht)
                } else {
                    PeerSource::Inbound
                };
                let entry = self.peers.entry(peer_id).or_insert(ConnectedPeer {
                    peer_id,
                    source,
                    addrs: Vec::new(),
                });
                if !entry.addrs.contains(&addr) && entry.addrs.len() < 8 {
                    entry.addrs.push(addr.clone());
                }
                if self.relay_listeners.is_relay(&peer_id) && !endpoint.is_relayed() {
                    self.listen_via_relays();
                }
                if num_established.get() == 1 {
                    self.emit(NetEvent::Connected {
                        peer: peer_id,
                        addr,
                    })
                    .await?;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.peers.remove(&peer_id);
                self.relay_discovery.gone(&peer_id);
                self.back_off(peer_id);
                self.emit(NetEvent::Disconnected { peer: peer_id }).await?;
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, "outgoing connection failed: {error}");
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    self.relay_discovery.gone(&peer);
                    self.back_off(peer);
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event).await?,
            _ => {}
        }
        Ok(())
    }

    async fn emit(&mut self, event: NetEvent) -> Result<(), ()> {
        self.events.send(event).await.map_err(|_| ())
    }

    async fn on_behaviour_event(&mut self, event: BehaviourEvent) -> Result<(), ()> {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.emit(NetEvent::Gossip {
                    message_id,
                    source: propagation_source,
                    topic: message.topic.into_string(),
                    data: message.data,
                })
                .await?;
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic, .. }) => {
                self.emit(NetEvent::Subscribed {
                    peer: peer_id,
                    topic: topic.into_string(),
                })
                .await?;
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Unsubscribed { peer_id, topic }) => {
                self.emit(NetEvent::Unsubscribed {
                    peer: peer_id,
                    topic: topic.into_string(),
                })
                .await?;
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let listen: Vec<Multiaddr> = info.listen_addrs.into_iter().take(16).collect();
                if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) {
                    for addr in &listen {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
                let connected_at = self
                    .peers
                    .get(&peer_id)
                    .map(|p| p.addrs.clone())
                    .unwrap_or_default();
                if let Some((relay, addr)) = self.relay_discovery.identified(
                    peer_id,
                    &info.protocols,
                    &listen,
                    &connected_at,
                ) {
                    self.adopt_relay(relay, addr).await?;
                }
                let addrs = listen
                    .into_iter()
                    .filter_map(|a| with_peer(a, peer_id))
                    .collect();
                self.emit(NetEvent::PeerAddrs {
                    peer: peer_id,
                    addrs,
                })
                .await?;
            }
            BehaviourEvent::Direct(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let (tx, rx) = oneshot::channel();
                        self.pending_responses
                            .push(Box::pin(async move { (rx.await.ok(), channel) }));
                        self.emit(NetEvent::Direct {
                            peer,
                            data: request,
                            reply: tx,
                        })
                        .await?;
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.pending_direct.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            // A peer that does not speak ping (a bare relay, say) is not
            // a dead connection.
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error),
            }) if !matches!(error, ping::Failure::Unsupported) => {
                tracing::debug!(%peer, "ping failed, closing the connection: {error}");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { .. }) => {
                self.kad_ready = true;
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                step,
                ..
            }) => {
                // A lookup of a member device with no known address: dial
                // it where the DHT says it is.
                if let Some(target) = self.dht_lookups.get(&id).copied() {
                    let found = match result {
                        Ok(ok) => ok.peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    if let Some(info) = found.into_iter().find(|p| p.peer_id == target)
                        && !info.addrs.is_empty()
                    {
                        self.remember(target, info.addrs, PeerSource::Dht);
                        self.dial(target, PeerSource::Dht);
                    }
                    if step.last {
                        self.dht_lookups.remove(&id);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) if self.relay_discovery.is_query(&id) => {
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                    let me = *self.swarm.local_peer_id();
                    let (adopted, dial) = self.relay_discovery.providers(providers, &me);
                    for (relay, addr) in adopted {
                        self.adopt_relay(relay, addr).await?;
                    }
                    for peer in dial {
                        // Addresses come from the query (Kademlia hands
                        // them to the dial); identify then confirms.
                        self.dial(peer, PeerSource::Dht);
                    }
                }
                if step.last {
                    self.relay_discovery.finished(tokio::time::Instant::now());
                }
            }
            BehaviourEvent::Direct(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_direct.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Direct(error.to_string())));
                }
            }
            BehaviourEvent::Mailbox(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        // Only a wakeup is expected from a relay; the engine
                        // decides (and answers nothing but "ok").
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .mailbox
                            .send_response(channel, crate::mailbox::MailboxResponse::Ok.encode());
                        if matches!(
                            crate::mailbox::MailboxRequest::decode(&request),
                            Some(crate::mailbox::MailboxRequest::Wakeup)
                        ) {
                            self.emit(NetEvent::MailWaiting { relay: peer }).await?;
                        }
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.pending_mailbox.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            BehaviourEvent::Mailbox(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_mailbox.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Direct(error.to_string())));
                }
            }
            BehaviourEvent::RelayClient(event) => match event {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                } => {
                    if !renewal {
                        tracing::info!(relay = %relay_peer_id, "reservation accepted: reachable through the relay");
                    }
                    self.relay_listeners.reserved(&relay_peer_id);
                }
                relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                    tracing::debug!(relay = %relay_peer_id, "outbound circuit established");
                }
                relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                    tracing::debug!(peer = %src_peer_id, "inbound circuit established");
                }
            },
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => tracing::info!(peer = %remote_peer_id, "hole punched: direct connection"),
                Err(e) => {
                    tracing::debug!(peer = %remote_peer_id, "hole punching failed: {e}")
                }
            },
            _ => {}
        }
        Ok(())
    }

    fn start_mdns(&mut self, first_addr: &Multiaddr) {
        let peer_id = *self.swarm.local_peer_id();
        let port = first_addr.iter().find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        });
        let Some(port) = port else { return };
        match mdns::Mdns::start(peer_id, port, self.self_commands.clone()) {
            Ok(m) => self.mdns = Some(m),
            Err(e) => tracing::warn!("mDNS discovery is off: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn redial_delay_doubles_up_to_the_cap() {
        let delays: Vec<Duration> = (0..40).map(|n| redial_delay(BASE, MAX, n, 1.0)).collect();
        assert_eq!(delays[0], BASE);
        assert_eq!(delays[1], 2 * BASE);
        assert_eq!(delays[4], 16 * BASE);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert!(delays.iter().all(|d| *d <= MAX));
        assert_eq!(delays[5], MAX);
        assert_eq!(redial_delay(BASE, MAX, u32::MAX, 1.0), MAX);
        // A cap too large for the doubling still saturates, never panics.
        let huge = redial_delay(BASE, Duration::MAX, u32::MAX, 1.5);
        assert!(huge >= BASE * u32::MAX);
    }

    #[test]
    fn redial_delay_jitter_stays_within_half_and_one_and_a_half() {
        for attempts in 0..10 {
            let plain = redial_delay(BASE, MAX, attempts, 1.0);
            for _ in 0..100 {
                let d = redial_delay(BASE, MAX, attempts, jitter());
                assert!(d >= plain / 2 && d < plain * 3 / 2, "{d:?} vs {plain:?}");
            }
            assert_eq!(redial_delay(BASE, MAX, attempts, 0.5), plain / 2);
            // Out-of-range samples are clamped.
            assert_eq!(redial_delay(BASE, MAX, attempts, 0.0), plain / 2);
            assert_eq!(redial_delay(BASE, MAX, attempts, 9.0), plain * 3 / 2);
        }
    }

    #[test]
    fn jitter_samples_are_in_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.5..1.5).contains(&j), "{j}");
        }
    }

    /// Waits until `events` yields a `Connected` (or `Disconnected`) of
    /// `peer`, failing at `deadline`.
    async fn wait_for(
        events: &mut mpsc::Receiver<NetEvent>,
        peer: PeerId,
        connected: bool,
        deadline: tokio::time::Instant,
    ) {
        loop {
            let ev = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("timed out")
                .expect("network task stopped");
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
        use libp2p::core::transport::Transport as _;
        use libp2p::core::upgrade::Version;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                libp2p::core::transport::MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise::Config::new(key).unwrap())
                    .multiplex(yamux::Config::default())
            })
            .unwrap()
            .with_behaviour(|key| {
                relay::Behaviour::new(key.public().to_peer_id(), Default::default())
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
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
            let ev = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("timed out")
                .expect("network task stopped");
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
        let (a, mut events, _) =
            spawn(libp2p::identity::Keypair::generate_ed25519(), config).unwrap();
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
        let (relay_addr, _relay) =
            relay_server(libp2p::identity::Keypair::generate_ed25519(), port);
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
            let ev = tokio::time::timeout_at(deadline, b_events.recv())
                .await
                .expect("timed out")
                .unwrap();
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
            let ev = tokio::time::timeout_at(deadline, a_events.recv())
                .await
                .expect("timed out")
                .unwrap();
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

        let got =
            publish_and_watch(&a, &mut b_events, &mut s_events, topic, control, deadline).await;
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

        let got =
            publish_and_watch(&a, &mut b_events, &mut s_events, topic, control, deadline).await;
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
            let ev = tokio::time::timeout_at(deadline, a_events.recv())
                .await
                .unwrap()
                .unwrap();
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
            let ev = tokio::time::timeout_at(deadline, b_events.recv())
                .await
                .unwrap()
                .unwrap();
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
            let ev = tokio::time::timeout_at(deadline, a_events.recv())
                .await
                .unwrap()
                .unwrap();
            if let NetEvent::Direct { data, reply, .. } = ev {
                assert_eq!(data, b"ping");
                reply.send(b"pong".to_vec()).unwrap();
                break;
            }
        }
        assert_eq!(rx.await.unwrap().unwrap(), b"pong");
    }
}
