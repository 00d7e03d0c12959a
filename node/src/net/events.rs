//! What the swarm reports, handled by the network task: listeners
//! opening and closing, connections established and lost, and the
//! behaviours' events (gossip, identify, direct and mailbox requests,
//! ping failures, peers too slow to take their gossip, DHT lookups, relay
//! reservations, hole punching), turned into [`NetEvent`]s for the node
//! and into dials, redials, closed connections and relay listeners.

use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, dcutr, gossipsub, identify, kad, ping, relay, request_response};
use tokio::sync::oneshot;

use super::behaviour::{BehaviourEvent, GOSSIP_QUEUE};
use super::peers::with_peer;
use super::task::NetworkTask;
use super::{ConnectedPeer, KAD_PROTOCOL, NetError, NetEvent, PeerSource, relay_client};

use crate::backoff;

impl NetworkTask {
    /// Handles one swarm event. `Err` when the node has gone away.
    pub(super) async fn on_swarm_event(
        &mut self,
        event: SwarmEvent<BehaviourEvent>,
    ) -> Result<(), ()> {
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
                let redial = self.config.redial_backoff();
                if let Some(relay) =
                    self.relay_listeners
                        .closed(listener_id, reason.is_err(), now, |n| {
                            redial.delay(n, backoff::jitter())
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
                let ip = super::offenders::ip_of(endpoint.get_remote_address());
                if self
                    .offenders
                    .is_banned(&peer_id, ip, tokio::time::Instant::now())
                {
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
                self.slow_peers.remove(&peer_id);
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

    /// A peer that does not take its gossip: its send queue was full (or
    /// messages waited there too long) and `failed` were dropped for it.
    /// Once a whole queue's worth has been dropped, its connections are
    /// closed, and the queue with them: a peer that stopped reading costs
    /// at most one full queue, for as long as that takes. Not a ban:
    /// slowness is no offence, and it catches up through the outbox once
    /// reconnected, as a peer that went away does.
    fn on_slow_peer(&mut self, peer: libp2p::PeerId, failed: gossipsub::FailedMessages) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        let dropped = self.slow_peers.entry(peer).or_default();
        *dropped = dropped.saturating_add(failed.priority + failed.non_priority);
        tracing::debug!(%peer, dropped = *dropped, "gossip dropped for a slow peer");
        if *dropped >= GOSSIP_QUEUE {
            tracing::info!(%peer, "closing the connections of a peer that does not take its gossip");
            self.slow_peers.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
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
            BehaviourEvent::Gossipsub(gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            }) => self.on_slow_peer(peer_id, failed_messages),
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
                    let _ = reply.send(Err(NetError::Direct(error)));
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
                    let _ = reply.send(Err(NetError::Direct(error)));
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
}
