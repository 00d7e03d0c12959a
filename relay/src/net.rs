//! The swarm task: the relay's libp2p node. TCP + QUIC (or the memory
//! transport in tests) with noise and yamux; identify (`/weft/1.0.0`),
//! ping, Kademlia (`/weft/kad/1.0.0`, server mode: the relay doubles as a
//! bootstrap node), circuit relay v2, AutoNAT (v1 and v2 servers), the
//! mailbox protocol (`/weft/mailbox/1`) and connection limits (in all,
//! per peer, per IP address: `weft_proto::ip_limits`, and by memory). It
//! announces itself in the DHT as a provider of the relay key, so that
//! nodes find relays without being given one.
//!
//! The task owns the swarm and the [`Service`]: it hands each mailbox
//! request to the service with the peer id and source address of the
//! connection it came on, polls the futures it returns and sends each
//! response when it is ready, then routes the wakeups the responses ask
//! for (live over the device's connection, or UnifiedPush). It is reached
//! through a bounded command channel ([`NetHandle`]).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use libp2p::core::transport::ListenerId;
use libp2p::metrics::{Metrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{ConnectionId, ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, identify, kad,
    memory_connection_limits, ping, relay,
};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use weft_proto::ip_limits::{IpConnectionLimits, TooManyFromIp};
use weft_proto::mailbox::{MAILBOX_PROTOCOL, MailboxRequest};
use weft_proto::net::{DirectCodec, IDENTIFY_PROTOCOL, KAD_PROTOCOL, RELAY_PROVIDER_KEY};
use weft_proto::transport::{self, SwarmConfig, TransportKind};

use crate::config::Config;
use crate::depositor::Source;
use crate::limiter::TokenBucket;
use crate::metrics::RelayMetrics;
use crate::service::{Handled, Service};
use crate::store::WakeTarget;
use crate::wakeup::{Coalescer, HttpWaker};

/// Mailbox requests being handled at once, and their bytes; beyond either
/// requests are refused as `Unavailable` until some finish.
const MAX_IN_FLIGHT: usize = 8192;
const MAX_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
/// Mailbox streams one connection may have open at once (each may carry
/// a frame of up to 8 MiB).
const MAX_STREAMS_PER_CONNECTION: usize = 64;
/// How often due wakeups are sent.
const WAKE_TICK: Duration = Duration::from_millis(250);
/// How long a drain may take before the task stops anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of the command channel.
const COMMAND_CAPACITY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("transport setup failed: {0}")]
    Transport(String),
    #[error("cannot listen on {0}: {1}")]
    Listen(Multiaddr, String),
    #[error("the network task has stopped")]
    Stopped,
}

/// An error with its sources, as one line: libp2p's transport errors
/// keep the OS's reason ("Address already in use") in their source, and
/// some display nothing themselves.
fn reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    per_ip: IpConnectionLimits,
    memory: Toggle<memory_connection_limits::Behaviour>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    relay: Toggle<relay::Behaviour>,
    autonat: Toggle<autonat::Behaviour>,
    autonat_v2: Toggle<autonat::v2::server::Behaviour>,
    mailbox: request_response::Behaviour<DirectCodec>,
}

fn build_behaviour(key: &libp2p::identity::Keypair, config: &Config) -> Behaviour {
    let peer_id = key.public().to_peer_id();
    let l = &config.limits;
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(l.max_connections))
            .with_max_established_per_peer(Some(l.max_connections_per_peer))
            .with_max_pending_incoming(Some(l.max_pending_incoming)),
    );
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(format!("weft-relay/{}", env!("CARGO_PKG_VERSION"))),
    );
    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_config.set_query_timeout(Duration::from_secs(30));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
    kad.set_mode(Some(kad::Mode::Server));
    let c = &config.circuit_relay;
    let relay = c.enabled.then(|| {
        let mut r = relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_reservations: c.max_reservations,
                max_reservations_per_peer: c.max_reservations_per_peer,
                reservation_duration: Duration::from_secs(c.reservation_duration_secs),
                max_circuits: c.max_circuits,
                max_circuits_per_peer: c.max_circuits_per_peer,
                max_circuit_duration: Duration::from_secs(
                    c.max_circuit_duration_secs.min(u64::from(u32::MAX)),
                ),
                max_circuit_bytes: c.max_circuit_bytes,
                ..relay::Config::default()
            },
        );
        // Serve relaying whatever the relay knows of its own
        // reachability: that is what it is for.
        r.set_status(Some(relay::Status::Enable));
        r
    });
    let (autonat, autonat_v2) = if config.autonat.enabled {
        let v1 = autonat::Behaviour::new(
            peer_id,
            autonat::Config {
                only_global_ips: config.autonat.only_global_ips,
                ..autonat::Config::default()
            },
        );
        (Some(v1), Some(autonat::v2::server::Behaviour::default()))
    } else {
        (None, None)
    };
    let mailbox = request_response::Behaviour::with_codec(
        DirectCodec,
        [(StreamProtocol::new(MAILBOX_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(30))
            .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
    );
    let memory = (l.max_memory_mb > 0).then(|| {
        let bytes = l.max_memory_mb.saturating_mul(1024 * 1024);
        memory_connection_limits::Behaviour::with_max_bytes(
            usize::try_from(bytes).unwrap_or(usize::MAX),
        )
    });
    Behaviour {
        limits,
        per_ip: IpConnectionLimits::new(l.max_connections_per_ip, l.limit_loopback_per_ip)
            .with_setting("limits.max_connections_per_ip"),
        memory: memory.into(),
        identify,
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
        kad,
        relay: relay.into(),
        autonat: autonat.into(),
        autonat_v2: autonat_v2.into(),
        mailbox,
    }
}

fn is_memory(addr: &Multiaddr) -> bool {
    matches!(addr.iter().next(), Some(Protocol::Memory(_)))
}

fn is_local(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        Some(Protocol::Memory(_)) => true,
        _ => false,
    }
}

/// The swarm of `key`: TCP and QUIC, or the memory transport (tests),
/// with bandwidth metrics (the builder is shared with the node).
fn build_swarm(
    key: libp2p::identity::Keypair,
    config: &Config,
    memory: bool,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>, NetError> {
    let swarm_config = SwarmConfig {
        transport: if memory {
            TransportKind::Memory
        } else {
            TransportKind::Network
        },
        idle_connection_timeout: Duration::from_secs(config.limits.idle_timeout_secs),
        bandwidth_metrics: Some(registry),
    };
    transport::build_swarm(key, swarm_config, |key| build_behaviour(key, config))
        .map_err(|e| NetError::Transport(e.to_string()))
}

enum NetCommand {
    /// Drain: stop listening, refuse new requests, finish and send the
    /// answers in flight (up to [`DRAIN_TIMEOUT`]), then stop.
    Shutdown(oneshot::Sender<()>),
}

/// A handle to the swarm task.
#[derive(Clone, Debug)]
pub struct NetHandle {
    tx: mpsc::Sender<NetCommand>,
}

impl std::fmt::Debug for NetCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shutdown")
    }
}

impl NetHandle {
    /// Drains and stops the task; returns when it has.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(NetCommand::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The swarm task once it listens.
#[derive(Debug)]
pub struct Started {
    pub handle: NetHandle,
    pub peer_id: PeerId,
    /// Where it listens (ports resolved).
    pub listen: Vec<Multiaddr>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the swarm task and waits until every listener listens.
pub async fn start(
    key: libp2p::identity::Keypair,
    config: &Config,
    service: Service,
    waker: Option<HttpWaker>,
    registry: &mut Registry,
) -> Result<Started, NetError> {
    let peer_id = key.public().to_peer_id();
    let listen = config
        .listen_addrs()
        .map_err(|e| NetError::Transport(e.to_string()))?;
    let external = config
        .external_addrs()
        .map_err(|e| NetError::Transport(e.to_string()))?;
    let memory = !listen.is_empty() && listen.iter().all(is_memory);
    let mut swarm = build_swarm(key, config, memory, registry)?;
    let mut listeners = HashSet::new();
    for addr in &listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen(addr.clone(), reason(&e)))?;
        listeners.insert(id);
    }
    for addr in &external {
        swarm.add_external_address(addr.clone());
    }
    let bootstrap = config
        .bootstrap_addrs()
        .map_err(|e| NetError::Transport(e.to_string()))?;
    for (peer, addr) in &bootstrap {
        swarm.behaviour_mut().kad.add_address(peer, addr.clone());
    }
    if !bootstrap.is_empty() {
        // Errors only without peers, and there are some.
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
    let libp2p_metrics = Metrics::new(registry);
    let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
    let (ready_tx, ready_rx) = oneshot::channel();
    let w = &config.wakeup;
    let now = Instant::now();
    let task = NetTask {
        swarm,
        commands: rx,
        relay_metrics: service.metrics().clone(),
        service,
        libp2p_metrics,
        in_flight: FuturesUnordered::new(),
        in_flight_bytes: 0,
        sources: HashMap::new(),
        unflushed: 0,
        listeners: listeners.iter().copied().collect(),
        awaiting: listeners,
        ready: Some(ready_tx),
        announce_listen: external.is_empty(),
        announce_local: listen.iter().all(is_local),
        advertise: config.dht.advertise,
        live: Coalescer::new(Duration::from_millis(w.live_min_interval_ms)),
        http: Coalescer::new(Duration::from_secs(w.min_interval_secs)),
        http_bucket: TokenBucket::new(f64::from(w.max_per_sec), w.max_per_sec, now),
        waker,
    };
    let task = tokio::spawn(task.run());
    let listen = match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
        Ok(Ok(Ok(listen))) => listen,
        Ok(Ok(Err((addr, e)))) => return Err(NetError::Listen(addr, e)),
        Ok(Err(_)) => return Err(NetError::Stopped),
        Err(_) => {
            return Err(NetError::Transport(
                "the listeners did not come up within 30 s".into(),
            ));
        }
    };
    Ok(Started {
        handle: NetHandle { tx },
        peer_id,
        listen,
        task,
    })
}

/// A request being handled: its answer, where to send it, its size.
type InFlight = BoxFuture<'static, (Handled, ResponseChannel<Vec<u8>>, usize)>;
type Ready = oneshot::Sender<Result<Vec<Multiaddr>, (Multiaddr, String)>>;

struct NetTask {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<NetCommand>,
    service: Service,
    relay_metrics: RelayMetrics,
    libp2p_metrics: Metrics,
    in_flight: FuturesUnordered<InFlight>,
    in_flight_bytes: usize,
    /// Where each established connection comes from (as many entries as
    /// connections: the connection limits bound them).
    sources: HashMap<ConnectionId, Source>,
    /// Responses handed to the swarm and not yet reported sent or failed.
    unflushed: usize,
    listeners: Vec<ListenerId>,
    /// Listeners that have not reported an address yet.
    awaiting: HashSet<ListenerId>,
    ready: Option<Ready>,
    /// No external addresses configured: announce listen addresses.
    announce_listen: bool,
    /// Listening on loopback or memory only: announce those too.
    announce_local: bool,
    /// Announce this relay in the DHT (once listening).
    advertise: bool,
    live: Coalescer,
    http: Coalescer,
    http_bucket: TokenBucket,
    waker: Option<HttpWaker>,
}

impl NetTask {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(WAKE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = self.commands.recv() => {
                    let done = cmd.map(|NetCommand::Shutdown(done)| done);
                    self.drain().await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((handled, channel, size)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.in_flight_bytes = self.in_flight_bytes.saturating_sub(size);
                    self.respond(handled, channel);
                }
                _ = tick.tick() => self.wake_due(Instant::now()),
            }
        }
    }

    async fn drain(&mut self) {
        self.service.drain();
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while !self.in_flight.is_empty() || self.unflushed > 0 {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((handled, channel, size)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.in_flight_bytes = self.in_flight_bytes.saturating_sub(size);
                    self.respond(handled, channel);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        in_flight = self.in_flight.len(),
                        unflushed = self.unflushed,
                        "drain timed out"
                    );
                    break;
                }
            }
        }
    }

    fn respond(&mut self, handled: Handled, channel: ResponseChannel<Vec<u8>>) {
        let Handled { response, wake } = handled;
        if self
            .swarm
            .behaviour_mut()
            .mailbox
            .send_response(channel, response.encode())
            .is_ok()
        {
            self.unflushed += 1;
        }
        if let Some(target) = wake {
            self.route_wake(target, Instant::now());
        }
    }

    /// Mail arrived for `target`'s mailbox.
    fn route_wake(&mut self, target: WakeTarget, now: Instant) {
        if self.swarm.is_connected(&target.peer) {
            if let Some(t) = self.live.arrived(target, now) {
                self.send_live(t, now);
            }
        } else if target.wakeup.is_some()
            && self.waker.is_some()
            && let Some(t) = self.http.arrived(target, now)
        {
            self.send_http(t, now);
        }
    }

    fn send_live(&mut self, target: WakeTarget, now: Instant) {
        self.swarm
            .behaviour_mut()
            .mailbox
            .send_request(&target.peer, MailboxRequest::Wakeup.encode());
        self.live.sent(target.mailbox, now);
        self.relay_metrics.wakeup_sent("live");
    }

    fn send_http(&mut self, target: WakeTarget, now: Instant) {
        let (Some(waker), Some(url)) = (&self.waker, &target.wakeup) else {
            return;
        };
        if self.http_bucket.try_take(now) && waker.wake(url.clone()) {
            self.http.sent(target.mailbox, now);
        } else {
            // Over the relay-wide rate or the queue is full: later.
            self.http.defer(target);
        }
    }

    fn wake_due(&mut self, now: Instant) {
        for target in self.live.due(now) {
            if self.swarm.is_connected(&target.peer) {
                self.send_live(target, now);
            } else if target.wakeup.is_some()
                && self.waker.is_some()
                && let Some(t) = self.http.arrived(target, now)
            {
                self.send_http(t, now);
            }
        }
        for target in self.http.due(now) {
            if self.swarm.is_connected(&target.peer) {
                if let Some(t) = self.live.arrived(target, now) {
                    self.send_live(t, now);
                }
            } else {
                self.send_http(target, now);
            }
        }
    }

    /// Provides [`RELAY_PROVIDER_KEY`] in the DHT: the record lives here
    /// (answering lookups that reach this relay) and at the peers closest
    /// to the key; Kademlia republishes it periodically.
    fn advertise(&mut self) {
        let key = kad::RecordKey::new(&RELAY_PROVIDER_KEY);
        match self.swarm.behaviour_mut().kad.start_providing(key) {
            Ok(_) => tracing::info!("announcing this relay in the DHT"),
            Err(e) => tracing::warn!("cannot announce this relay in the DHT: {e}"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!("listening on {address}");
                if self.announce_listen && (self.announce_local || !is_local(&address)) {
                    self.swarm.add_external_address(address.clone());
                }
                self.awaiting.remove(&listener_id);
                if self.awaiting.is_empty()
                    && let Some(ready) = self.ready.take()
                {
                    if self.advertise {
                        self.advertise();
                    }
                    let _ = ready.send(Ok(self.swarm.listeners().cloned().collect()));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                if self.awaiting.contains(&listener_id)
                    && let Some(ready) = self.ready.take()
                {
                    let addr = addresses.first().cloned().unwrap_or_else(Multiaddr::empty);
                    let why = match reason {
                        Ok(()) => "closed".to_string(),
                        Err(e) => self::reason(&e),
                    };
                    let _ = ready.send(Err((addr, why)));
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::warn!("listener error: {error}");
                if self.awaiting.contains(&listener_id)
                    && let Some(ready) = self.ready.take()
                {
                    let _ = ready.send(Err((Multiaddr::empty(), reason(&error))));
                }
            }
            SwarmEvent::ConnectionEstablished {
                connection_id,
                endpoint,
                ..
            } => {
                let source = Source::of_addr(endpoint.get_remote_address());
                self.sources.insert(connection_id, source);
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.sources.remove(&connection_id);
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { cause },
                ..
            } if cause.downcast_ref::<TooManyFromIp>().is_some() => {
                self.relay_metrics.refused_per_ip();
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Mailbox(request_response::Event::Message {
                peer,
                connection_id,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
            }) => {
                // Always known (a connection is established before it
                // carries a request); unknown would share one key.
                let source = self
                    .sources
                    .get(&connection_id)
                    .copied()
                    .unwrap_or(Source::Unknown);
                let size = request.len();
                let handled = if self.in_flight.len() >= MAX_IN_FLIGHT
                    || self.in_flight_bytes + size > MAX_IN_FLIGHT_BYTES
                {
                    self.relay_metrics
                        .refused(weft_proto::mailbox::Refusal::Unavailable);
                    let busy = Handled {
                        response: weft_proto::mailbox::MailboxResponse::refused(
                            weft_proto::mailbox::Refusal::Unavailable,
                            "the relay is busy; try again shortly",
                        ),
                        wake: None,
                    };
                    futures::future::ready(busy).boxed()
                } else {
                    self.service
                        .handle(peer, source, &request, Instant::now(), crate::now_ms())
                };
                self.in_flight_bytes += size;
                self.in_flight
                    .push(Box::pin(async move { (handled.await, channel, size) }));
            }
            BehaviourEvent::Mailbox(request_response::Event::ResponseSent { .. })
            | BehaviourEvent::Mailbox(request_response::Event::InboundFailure { .. }) => {
                self.unflushed = self.unflushed.saturating_sub(1);
            }
            BehaviourEvent::Mailbox(_) => {}
            BehaviourEvent::Identify(event) => {
                self.libp2p_metrics.record(&event);
                if let identify::Event::Received { peer_id, info, .. } = event
                    && info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL)
                {
                    for addr in info.listen_addrs.iter().take(16) {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
            }
            BehaviourEvent::Kad(event) => self.libp2p_metrics.record(&event),
            BehaviourEvent::Ping(event) => self.libp2p_metrics.record(&event),
            BehaviourEvent::Relay(event) => {
                tracing::debug!(?event, "circuit relay");
                self.libp2p_metrics.record(&event);
            }
            BehaviourEvent::Autonat(event) => tracing::debug!(?event, "autonat"),
            BehaviourEvent::AutonatV2(event) => tracing::debug!(?event, "autonat v2"),
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::PerIp(never) => match never {},
            BehaviourEvent::Memory(never) => match never {},
        }
    }
}
