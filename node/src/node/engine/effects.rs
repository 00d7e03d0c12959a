//! Effects: what a batch does outside the engine (network commands,
//! replies, events), run after its commit or, for envelopes that may
//! leave early, at once; and the engine's inputs.

use libp2p::PeerId;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::api::{ApiError, Event};
use crate::ids::EnvelopeId;
use crate::net::{NetCommand, NetEvent, NetHandle};

use super::{DIRECT_BATCH, DirectRequest, DirectResponse, Effect, Internal, relay};
use crate::node::Command;

/// Where effects go: the network, `watch` subscribers, and the engine's
/// own queue of direct-send results.
pub(super) struct Outlets {
    /// Set when an effect ran before its batch committed.
    pub(super) sent_early: std::cell::Cell<bool>,
    pub(super) net: Option<NetHandle>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) internal_tx: mpsc::Sender<Internal>,
}

impl Outlets {
    pub(super) fn net_cmd(&self, cmd: NetCommand) {
        if let Some(net) = &self.net
            && !net.try_send(cmd)
        {
            // The outbox and retry tick cover anything dropped here.
            tracing::warn!("network command queue full; command dropped");
        }
    }

    pub(super) fn send_direct(&self, peer: PeerId, envelopes: Vec<(EnvelopeId, Vec<u8>)>) {
        let Some(net) = &self.net else { return };
        for chunk in envelopes.chunks(DIRECT_BATCH) {
            let ids: Vec<EnvelopeId> = chunk.iter().map(|(id, _)| *id).collect();
            let request = DirectRequest::Envelopes(chunk.iter().map(|(_, b)| b.clone()).collect());
            let Ok(data) = postcard::to_stdvec(&request) else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            if !net.try_send(NetCommand::Direct {
                peer,
                data,
                reply: tx,
            }) {
                continue;
            }
            let internal = self.internal_tx.clone();
            tokio::spawn(async move {
                // All or nothing: a refused envelope in the batch means the
                // peer may lack some of them, so all are offered again
                // (it ignores those it has).
                let ok = matches!(
                    rx.await
                        .ok()
                        .and_then(|r| r.ok())
                        .and_then(|b| postcard::from_bytes::<DirectResponse>(&b).ok()),
                    Some(DirectResponse::Ack { accepted }) if accepted as usize == ids.len()
                );
                let _ = internal.send(Internal::DirectAck { peer, ids, ok }).await;
            });
        }
    }
}

impl Outlets {
    /// Sends a direct request whose answer (or its absence) comes back to
    /// the engine as the `Internal` that `answered` makes of it.
    pub(super) fn ask(
        &self,
        peer: PeerId,
        request: &DirectRequest,
        answered: impl FnOnce(Option<DirectResponse>) -> Internal + Send + 'static,
    ) {
        let internal = self.internal_tx.clone();
        let Some(rx) = self.request(peer, request) else {
            let _ = internal.try_send(answered(None));
            return;
        };
        tokio::spawn(async move {
            let response = rx
                .await
                .ok()
                .and_then(|r| r.ok())
                .and_then(|b| postcard::from_bytes::<DirectResponse>(&b).ok());
            let _ = internal.send(answered(response)).await;
        });
    }

    /// Sends a mailbox request to a relay; the answer (or its absence)
    /// comes back to the engine.
    pub(super) fn mailbox(
        &self,
        peer: PeerId,
        request: crate::mailbox::MailboxRequest,
        then: relay::MailboxThen,
    ) {
        let internal = self.internal_tx.clone();
        let rx = self.net.as_ref().and_then(|net| {
            let (tx, rx) = oneshot::channel();
            net.try_send(NetCommand::Mailbox {
                peer,
                data: request.encode(),
                reply: tx,
            })
            .then_some(rx)
        });
        tokio::spawn(async move {
            let response = match rx {
                Some(rx) => rx
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .and_then(|b| crate::mailbox::MailboxResponse::decode(&b)),
                None => None,
            };
            let _ = internal
                .send(Internal::MailboxReply {
                    relay: peer,
                    then,
                    response,
                })
                .await;
        });
    }

    pub(super) fn request(
        &self,
        peer: PeerId,
        request: &DirectRequest,
    ) -> Option<oneshot::Receiver<Result<Vec<u8>, crate::net::NetError>>> {
        let net = self.net.as_ref()?;
        let data = postcard::to_stdvec(request).ok()?;
        let (tx, rx) = oneshot::channel();
        net.try_send(NetCommand::Direct {
            peer,
            data,
            reply: tx,
        })
        .then_some(rx)
    }
}

pub(super) fn run_effects(outlets: &Outlets, fx: Vec<Effect>) {
    for effect in fx {
        match effect {
            Effect::Net(cmd) => outlets.net_cmd(cmd),
            Effect::Event(ev) => {
                let _ = outlets.events.send(ev);
            }
            Effect::Reply(reply, result) => {
                // The one place an engine error becomes the user's.
                let _ = reply.send(result.map_err(ApiError::from));
            }
            Effect::DirectReply(reply, bytes) => {
                let _ = reply.send(bytes);
            }
            Effect::Accepted(reply, n) => {
                let _ = reply.send(n);
            }
            Effect::Direct { peer, envelopes } => outlets.send_direct(peer, envelopes),
            Effect::Sync {
                peer,
                conv,
                request,
            } => outlets.ask(peer, &request, move |response| Internal::Synced {
                peer,
                conv,
                response,
            }),
            Effect::Mailbox {
                peer,
                request,
                then,
            } => outlets.mailbox(peer, request, then),
            Effect::Notify { peer, request } => {
                // The answer does not matter; dropping its receiver is fine.
                let _ = outlets.request(peer, &request);
            }
            Effect::History { peer, request } => {
                outlets.ask(peer, &DirectRequest::History(request), move |response| {
                    Internal::History { peer, response }
                })
            }
        }
    }
}

/// Lets the network task and the connection tasks, which share this
/// thread, put what was just published on the wire: a turn for each hop
/// (swarm, connection, stream).
pub(super) async fn let_network_run() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

pub(super) async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn recv_opt(rx: &mut Option<mpsc::Receiver<NetEvent>>) -> Option<NetEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) enum Input {
    Command(Command),
    Net(NetEvent),
    Internal(Internal),
    /// The outbox, presence and typing timers.
    Tick,
    Heartbeat,
    SyncTick,
    /// Time to send the delivered receipts waiting.
    Acknowledge,
}

pub(super) fn fail_inputs(batch: Vec<Input>, why: &str) {
    for input in batch {
        match input {
            Input::Command(Command::Api { reply, .. }) => {
                let _ = reply.send(Err(ApiError::failed(format!("storage: {why}"))));
            }
            Input::Command(Command::Deliver { reply, .. }) => {
                let _ = reply.send(0);
            }
            _ => {}
        }
    }
}
