//! The network task: [`spawn`] builds the swarm and starts the task,
//! whose run loop serves the node's commands, the swarm's events, the
//! node's answers to direct requests and the DHT refresh and redial
//! timers. The relays in use are listened through here, and more are
//! looked for in the DHT while too few are.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::{Multiaddr, PeerId, Swarm, kad};
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, build_swarm};
use super::offenders::Offenders;
use super::peers::{KnownPeer, REDIAL_TICK};
use super::{
    COMMAND_CAPACITY, ConnectedPeer, EVENT_CAPACITY, NetCommand, NetConfig, NetError, NetEvent,
    NetHandle, NetStatus, PeerSource, mdns, relay_client, relay_discovery, scoring,
};

use crate::backoff;

/// How often the DHT routing table is refreshed.
const DHT_REFRESH: Duration = Duration::from_secs(300);

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
    let offenders = Offenders::default();
    let mut swarm = build_swarm(key, &config, offenders.banned_addresses())?;
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen(addr.clone(), e))?;
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
        offenders,
        kad_ready: false,
        dht_lookups: HashMap::new(),
        slow_peers: HashMap::new(),
    };
    let join = tokio::spawn(task.run());
    Ok((handle, event_rx, join))
}

type PendingResponse = std::pin::Pin<
    Box<dyn Future<Output = (Option<Vec<u8>>, request_response::ResponseChannel<Vec<u8>>)> + Send>,
>;

/// The network task: the swarm and everything the task keeps about it.
pub(super) struct NetworkTask {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) commands: mpsc::Receiver<NetCommand>,
    pub(super) events: mpsc::Sender<NetEvent>,
    /// For the mDNS bridge, which feeds discoveries back as commands.
    pub(super) self_commands: mpsc::Sender<NetCommand>,
    pub(super) config: NetConfig,
    /// Closed on stop, so that a memory-transport port is free again.
    pub(super) listeners: Vec<ListenerId>,
    pub(super) peers: HashMap<PeerId, ConnectedPeer>,
    pub(super) dial_sources: HashMap<PeerId, PeerSource>,
    /// Peers to keep connected to (bootstrap, discovered), bounded.
    pub(super) known_peers: HashMap<PeerId, KnownPeer>,
    pub(super) pending_direct:
        HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, NetError>>>,
    pub(super) pending_mailbox:
        HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, NetError>>>,
    pub(super) pending_responses: FuturesUnordered<PendingResponse>,
    pub(super) mdns: Option<mdns::Mdns>,
    /// Strikes and bans, by peer id and address (bounded).
    pub(super) offenders: Offenders,
    /// Whether the DHT routing table has anyone in it.
    pub(super) kad_ready: bool,
    /// Peers being looked up in the DHT (bounded).
    pub(super) dht_lookups: HashMap<kad::QueryId, PeerId>,
    /// Gossip messages dropped for each connected peer whose send queue
    /// was full (gossipsub's slow peers), until its connections are
    /// closed; bounded by the connections held.
    pub(super) slow_peers: HashMap<PeerId, usize>,
    /// The circuit listeners at the relays in use.
    pub(super) relay_listeners: relay_client::RelayListeners,
    /// Relays looked for in the DHT.
    pub(super) relay_discovery: relay_discovery::RelayDiscovery,
}

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
                    self.ban_graylisted();
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
    pub(super) fn listen_via_relays(&mut self) {
        let now = tokio::time::Instant::now();
        let swarm = &self.swarm;
        let due = self.relay_listeners.due(now, |p| swarm.is_connected(p));
        let redial = self.config.redial_backoff();
        for (relay, circuit) in due {
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::debug!(%relay, "listening through relay at {circuit}");
                    self.relay_listeners.opened(&relay, id);
                }
                Err(e) => {
                    tracing::warn!(%relay, "cannot listen through relay at {circuit}: {e}");
                    self.relay_listeners
                        .failed(&relay, now, |n| redial.delay(n, backoff::jitter()));
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
    pub(super) async fn adopt_relay(&mut self, relay: PeerId, addr: Multiaddr) -> Result<(), ()> {
        tracing::info!(%relay, "using relay {addr} found through the DHT");
        self.relay_listeners.add(&addr, tokio::time::Instant::now());
        self.remember(relay, vec![addr.clone()], PeerSource::Relay);
        self.listen_via_relays();
        self.emit(NetEvent::RelayFound { relay, addr }).await
    }

    fn on_command(&mut self, cmd: NetCommand) {
        let behaviour = self.swarm.behaviour_mut();
        match cmd {
            NetCommand::Subscribe(topic) => {
                let topic = IdentTopic::new(topic);
                if let Err(e) = behaviour.gossipsub.subscribe(&topic) {
                    tracing::warn!("subscribe failed: {e}");
                }
                if let Err(e) = behaviour
                    .gossipsub
                    .set_topic_params(topic, scoring::topic_params())
                {
                    tracing::warn!("topic scoring: {e}");
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

    pub(super) async fn emit(&mut self, event: NetEvent) -> Result<(), ()> {
        self.events.send(event).await.map_err(|_| ())
    }

    pub(super) fn start_mdns(&mut self, first_addr: &Multiaddr) {
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
