//! Network events: what the network task reports (gossip, direct
//! requests, connections, relays) and the verdict on each gossip message.

use libp2p::PeerId;
use libp2p::gossipsub::{MessageAcceptance, MessageId as GossipId};

use crate::api::Event;
use crate::net::{NetCommand, NetEvent};

use super::{DIRECT_BATCH, DirectRequest, DirectResponse, Effect, Handed, State, Verdict, Via};

impl State<'_, '_> {
    pub(super) fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Gossip {
                message_id,
                source,
                topic,
                data,
            } => {
                let verdict = self.receive(&data, Via::Gossip(source), Some(&topic));
                self.report(message_id, source, verdict);
            }
            NetEvent::Direct { peer, data, reply } => {
                let response = match postcard::from_bytes::<DirectRequest>(&data) {
                    Ok(DirectRequest::Sync(request)) => self.answer_sync(peer, request),
                    Ok(DirectRequest::Link(request)) => self.answer_link(peer, request),
                    Ok(DirectRequest::History(request)) => self.answer_history(peer, request),
                    Ok(DirectRequest::Presence { interval_ms }) => {
                        self.on_presence(peer, interval_ms);
                        DirectResponse::Ack { accepted: 1 }
                    }
                    Ok(DirectRequest::Typing {
                        conversation,
                        typing,
                    }) => {
                        self.on_typing(peer, conversation, typing);
                        DirectResponse::Ack { accepted: 1 }
                    }
                    Ok(DirectRequest::Envelopes(envs)) => {
                        let mut accepted = 0u32;
                        self.preverify(envs.iter().take(DIRECT_BATCH).map(Vec::as_slice));
                        for bytes in envs.iter().take(DIRECT_BATCH) {
                            match self.receive(bytes, Via::Direct(Handed::SentBy(peer)), None) {
                                Verdict::Reject(why) => {
                                    tracing::debug!(%peer, "direct envelope rejected: {why}");
                                    self.fx.push(Effect::Net(NetCommand::Penalize {
                                        peer,
                                        reason: why,
                                    }));
                                }
                                _ => accepted += 1,
                            }
                        }
                        DirectResponse::Ack { accepted }
                    }
                    Err(_) => {
                        self.fx.push(Effect::Net(NetCommand::Penalize {
                            peer,
                            reason: "malformed direct request",
                        }));
                        DirectResponse::Refused("malformed request".into())
                    }
                };
                let bytes = postcard::to_stdvec(&response).unwrap_or_default();
                self.fx.push(Effect::DirectReply(reply, bytes));
            }
            NetEvent::Connected { peer, .. } => {
                self.e.connected.insert(peer);
                self.fx.push(Effect::Event(Event::Peer {
                    peer_id: peer.to_string(),
                    connected: true,
                }));
                self.flush_to(peer, None);
                self.heartbeat_to(peer);
                self.sync_with(peer);
                self.relay_connected(peer);
                self.history_from(peer);
            }
            NetEvent::Disconnected { peer } => {
                self.e.connected.remove(&peer);
                self.peer_gone(peer);
                self.e.topics.disconnected(&peer);
                self.fx.push(Effect::Event(Event::Peer {
                    peer_id: peer.to_string(),
                    connected: false,
                }));
            }
            NetEvent::Subscribed { peer, topic } => {
                let conv = self.e.topics.conversation_of_topic(&topic);
                self.e.topics.subscribed(peer, topic);
                if conv.is_some() {
                    self.flush_to(peer, conv);
                }
            }
            NetEvent::Unsubscribed { peer, topic } => {
                self.e.topics.unsubscribed(&peer, &topic);
            }
            NetEvent::Listening { .. } => {}
            NetEvent::RelayFound { relay, addr } => self.relay_found(relay, addr),
            NetEvent::PeerAddrs { peer, addrs } => self.peer_addrs(peer, addrs),
            NetEvent::MailWaiting { relay } => {
                if self.e.relays.uses(&relay) {
                    self.fetch_mail(relay);
                }
            }
        }
    }

    pub(super) fn report(&mut self, message_id: GossipId, source: PeerId, verdict: Verdict) {
        let acceptance = match verdict {
            Verdict::Accept => MessageAcceptance::Accept,
            Verdict::Ignore => MessageAcceptance::Ignore,
            Verdict::Reject(why) => {
                tracing::debug!(%source, "gossip message rejected: {why}");
                self.fx.push(Effect::Net(NetCommand::Penalize {
                    peer: source,
                    reason: why,
                }));
                MessageAcceptance::Reject
            }
        };
        self.fx.push(Effect::Net(NetCommand::Validation {
            message_id,
            source,
            acceptance,
        }));
    }
}
