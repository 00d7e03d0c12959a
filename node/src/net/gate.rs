//! The membership gate on gossip topics: which peers may subscribe to a
//! conversation's topic, and so receive what we publish or forward on it.
//!
//! Gossipsub sends a topic's messages (publish, forward, IHAVE, mesh) only
//! to peers it records as subscribed to it, and ignores a GRAFT from any
//! other. So gating who is recorded is enough, and that is done here:
//! [`Gossip`] wraps `gossipsub::Behaviour`, notes which peer's RPC it is
//! handing on, and [`GateFilter`] (gossipsub's subscription filter, which
//! is given no peer id) reads that peer from the shared [`GateState`].
//!
//! A topic the node registered (see [`Gossip::set_topic_members`]) lets
//! only its allowed peers subscribe; any other topic lets everyone (we
//! never publish there). Peers recorded as subscribed before a topic was
//! registered, or before they lost their place, have their connections
//! closed: when they come back, their subscriptions go through the filter.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::gossipsub::{self, TopicHash, TopicSubscriptionFilter};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Most topics registered at once: more than a person's conversations
/// (each has one topic). When full, the topic registered or updated
/// longest ago is forgotten, and is open again like an unregistered one.
pub const MAX_GATED_TOPICS: usize = 16_384;
/// Most peers allowed on one topic: every device of the largest group
/// (256 members with 16 devices each, `MAX_RECIPIENTS` of an envelope).
/// Peers beyond it are left out (not allowed), never the other way.
pub const MAX_MEMBERS_PER_TOPIC: usize = 4_096;
/// Most allowed peers over all topics (about 25 MiB at worst); when a new
/// allowed set would pass it, the oldest topics are forgotten first.
pub const MAX_GATED_MEMBERS: usize = 262_144;
/// Most peers waiting for their connections to be closed by the swarm.
/// Beyond it they are handed back to the network task, which disconnects
/// them itself.
pub const MAX_PENDING_CLOSES: usize = 4_096;

/// Gossipsub's subscription filter: the per-peer gate inside the existing
/// per-peer count limits.
pub(crate) type TopicFilter = gossipsub::MaxCountSubscriptionFilter<GateFilter>;
pub(crate) type Inner = gossipsub::Behaviour<gossipsub::IdentityTransform, TopicFilter>;

#[derive(Debug)]
struct Allowed {
    peers: HashSet<PeerId>,
    /// Its key in [`GateState::order`].
    seq: u64,
}

/// Who may subscribe to which registered topic, shared by [`Gossip`] and
/// [`GateFilter`].
#[derive(Debug, Default)]
pub(crate) struct GateState {
    topics: HashMap<TopicHash, Allowed>,
    /// Registered topics, least recently set first (for eviction).
    order: BTreeMap<u64, TopicHash>,
    next_seq: u64,
    /// Allowed peers over all topics.
    members: usize,
    /// The peer whose RPC gossipsub is handling; `None` outside of that
    /// (our own subscriptions).
    current: Option<PeerId>,
}

impl GateState {
    /// Replaces `topic`'s allowed set (registering the topic if need be).
    /// `true` when someone may have lost access: the topic is newly
    /// registered, or a peer allowed before is not now.
    fn set_members(&mut self, topic: TopicHash, peers: Vec<PeerId>) -> bool {
        let mut allowed = HashSet::with_capacity(peers.len().min(MAX_MEMBERS_PER_TOPIC));
        let mut left_out = 0usize;
        for peer in peers {
            if allowed.len() < MAX_MEMBERS_PER_TOPIC || allowed.contains(&peer) {
                allowed.insert(peer);
            } else {
                left_out += 1;
            }
        }
        if left_out > 0 {
            tracing::warn!(%topic, left_out, "too many peers for one topic: the rest are not allowed");
        }
        let narrowed = match self.topics.remove(&topic) {
            Some(old) => {
                self.order.remove(&old.seq);
                self.members -= old.peers.len();
                old.peers.iter().any(|p| !allowed.contains(p))
            }
            None => true,
        };
        while self.topics.len() >= MAX_GATED_TOPICS
            || self.members + allowed.len() > MAX_GATED_MEMBERS
        {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(evicted) = self.topics.remove(&oldest) {
                self.members -= evicted.peers.len();
                tracing::warn!(topic = %oldest, "membership gate full: forgetting the oldest topic");
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.members += allowed.len();
        self.order.insert(seq, topic.clone());
        self.topics.insert(
            topic,
            Allowed {
                peers: allowed,
                seq,
            },
        );
        narrowed
    }

    /// Whether `peer` may subscribe to `topic`: any peer on a topic never
    /// registered, only an allowed one on a registered topic.
    fn allows(&self, peer: &PeerId, topic: &TopicHash) -> bool {
        self.topics
            .get(topic)
            .is_none_or(|allowed| allowed.peers.contains(peer))
    }
}

fn lock(state: &Mutex<GateState>) -> MutexGuard<'_, GateState> {
    // The state stays consistent whatever panicked while holding it.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The subscription filter reading the gate. Gossipsub passes it topic
/// hashes only: its `Subscription` type is not exported, so the hooks that
/// see an action cannot be implemented outside the crate. A registered
/// topic's non-member thus has its unsubscribe dropped too; that changes
/// nothing, as it is never recorded as subscribed there (save while its
/// connections are being closed, which forgets all it subscribed to).
#[derive(Debug)]
pub(crate) struct GateFilter {
    state: Arc<Mutex<GateState>>,
}

impl TopicSubscriptionFilter for GateFilter {
    fn can_subscribe(&mut self, topic: &TopicHash) -> bool {
        let state = lock(&self.state);
        // No current peer: our own `subscribe`.
        let Some(peer) = state.current else {
            return true;
        };
        let allowed = state.allows(&peer, topic);
        if !allowed {
            tracing::debug!(%peer, %topic, "subscription from a non-member dropped");
        }
        allowed
    }
}

/// Clears the current peer when dropped (even if gossipsub panicked), so
/// that it never outlives the handler event.
struct CurrentPeer<'a>(&'a Mutex<GateState>);

impl<'a> CurrentPeer<'a> {
    fn set(state: &'a Mutex<GateState>, peer: PeerId) -> Self {
        lock(state).current = Some(peer);
        Self(state)
    }
}

impl Drop for CurrentPeer<'_> {
    fn drop(&mut self) {
        lock(self.0).current = None;
    }
}

/// Gossipsub behind the membership gate. Derefs to the inner behaviour
/// for publishing, subscribing and the rest.
#[derive(Debug)]
pub(crate) struct Gossip {
    inner: Inner,
    state: Arc<Mutex<GateState>>,
    /// Peers whose connections the swarm is to close (deduplicated).
    closes: VecDeque<PeerId>,
    /// Wakes the swarm when a close is queued outside of `poll`.
    waker: Option<Waker>,
}

impl Gossip {
    /// Gossipsub with the gate inside the given per-peer count limits.
    pub(crate) fn new(
        privacy: gossipsub::MessageAuthenticity,
        config: gossipsub::Config,
        max_subscribed_topics: usize,
        max_subscriptions_per_request: usize,
    ) -> Result<Self, &'static str> {
        let state = Arc::new(Mutex::new(GateState::default()));
        let filter = gossipsub::MaxCountSubscriptionFilter {
            filter: GateFilter {
                state: state.clone(),
            },
            max_subscribed_topics,
            max_subscriptions_per_request,
        };
        let inner = gossipsub::Behaviour::new_with_subscription_filter(privacy, config, filter)?;
        Ok(Self {
            inner,
            state,
            closes: VecDeque::new(),
            waker: None,
        })
    }

    /// Replaces the peers allowed on `topic` (registering it; an empty
    /// set allows nobody). Topics stay registered until evicted, whether
    /// or not we are subscribed. A connected peer recorded as subscribed
    /// to `topic` but not allowed now has its connections closed; the
    /// peers that could not be queued for that (beyond
    /// [`MAX_PENDING_CLOSES`]) are returned for the caller to disconnect.
    pub(crate) fn set_topic_members(
        &mut self,
        topic: TopicHash,
        peers: Vec<PeerId>,
    ) -> Vec<PeerId> {
        let mut state = lock(&self.state);
        if !state.set_members(topic.clone(), peers) {
            // Only peers added: nobody to cut off.
            return Vec::new();
        }
        let cut: Vec<PeerId> = self
            .inner
            .all_peers()
            .filter(|(peer, topics)| topics.contains(&&topic) && !state.allows(peer, &topic))
            .map(|(peer, _)| *peer)
            .collect();
        let mut overflow = Vec::new();
        for peer in cut {
            tracing::info!(%peer, %topic, "closing the connections of a peer not allowed on the topic");
            if self.closes.contains(&peer) {
                continue;
            }
            if self.closes.len() < MAX_PENDING_CLOSES {
                self.closes.push_back(peer);
            } else {
                overflow.push(peer);
            }
        }
        if !self.closes.is_empty()
            && let Some(waker) = self.waker.take()
        {
            waker.wake();
        }
        overflow
    }
}

impl Deref for Gossip {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl DerefMut for Gossip {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl NetworkBehaviour for Gossip {
    type ConnectionHandler = <Inner as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = <Inner as NetworkBehaviour>::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        // Subscriptions are only ever handled from here: the filter sees
        // whose they are through the current peer.
        let _current = CurrentPeer::set(&self.state, peer_id);
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        // Cutting a peer off comes before anything else gossipsub wants.
        if let Some(peer_id) = self.closes.pop_front() {
            return Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::All,
            });
        }
        match &self.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
        self.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> TopicHash {
        TopicHash::from_raw(name)
    }

    fn filter() -> GateFilter {
        GateFilter {
            state: Arc::new(Mutex::new(GateState::default())),
        }
    }

    /// What the filter says of `peer` subscribing to `t` (`None`: our own).
    fn passes(f: &mut GateFilter, peer: Option<PeerId>, t: &TopicHash) -> bool {
        lock(&f.state).current = peer;
        let ok = f.can_subscribe(t);
        lock(&f.state).current = None;
        ok
    }

    #[test]
    fn the_filter_lets_members_and_unregistered_topics_through_and_nobody_else() {
        let mut f = filter();
        let (member, stranger) = (PeerId::random(), PeerId::random());
        let (gated, plain) = (topic("gated"), topic("plain"));
        // Unregistered: anyone.
        assert!(passes(&mut f, Some(stranger), &gated));
        assert!(lock(&f.state).set_members(gated.clone(), vec![member]));
        assert!(passes(&mut f, Some(member), &gated));
        assert!(!passes(&mut f, Some(stranger), &gated));
        assert!(passes(&mut f, Some(stranger), &plain));
        // Our own subscriptions are never refused.
        assert!(passes(&mut f, None, &gated));
        // Nobody but still registered.
        assert!(lock(&f.state).set_members(gated.clone(), Vec::new()));
        assert!(!passes(&mut f, Some(member), &gated));
        assert!(!passes(&mut f, Some(stranger), &gated));
    }

    #[test]
    fn only_a_new_topic_or_a_lost_member_asks_for_a_cut_off() {
        let mut state = GateState::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let t = topic("t");
        assert!(state.set_members(t.clone(), vec![a]), "newly registered");
        assert!(!state.set_members(t.clone(), vec![a, b]), "only added");
        assert!(!state.set_members(t.clone(), vec![b, a, a]), "the same");
        assert!(state.set_members(t.clone(), vec![b]), "a lost its place");
        assert_eq!(state.members, 1);
        assert!(state.allows(&b, &t) && !state.allows(&a, &t));
    }

    #[test]
    fn the_gate_stays_bounded_and_forgets_the_oldest_topic_first() {
        let mut state = GateState::default();
        let peer = PeerId::random();
        for n in 0..MAX_GATED_TOPICS + 10 {
            state.set_members(topic(&n.to_string()), vec![peer]);
        }
        assert_eq!(state.topics.len(), MAX_GATED_TOPICS);
        assert_eq!(state.order.len(), MAX_GATED_TOPICS);
        assert_eq!(state.members, MAX_GATED_TOPICS);
        // The first ten are forgotten: open again, like any unregistered.
        let stranger = PeerId::random();
        assert!(state.allows(&stranger, &topic("9")));
        assert!(!state.allows(&stranger, &topic("10")));
        // Updating a topic makes it the newest: "10" outlives "11".
        state.set_members(topic("10"), vec![peer]);
        state.set_members(topic("new"), vec![peer]);
        assert!(!state.allows(&stranger, &topic("10")));
        assert!(state.allows(&stranger, &topic("11")));

        // Too many peers for one topic: the first ones are kept.
        let many: Vec<PeerId> = (0..MAX_MEMBERS_PER_TOPIC + 5)
            .map(|_| PeerId::random())
            .collect();
        let big = topic("big");
        state.set_members(big.clone(), many.clone());
        assert_eq!(state.topics[&big].peers.len(), MAX_MEMBERS_PER_TOPIC);
        assert!(state.allows(&many[0], &big));
        assert!(!state.allows(&many[MAX_MEMBERS_PER_TOPIC], &big));

        // The total: large sets push out the oldest topics.
        let mut state = GateState::default();
        let full: Vec<PeerId> = (0..MAX_MEMBERS_PER_TOPIC)
            .map(|_| PeerId::random())
            .collect();
        let fit = MAX_GATED_MEMBERS / MAX_MEMBERS_PER_TOPIC;
        for n in 0..fit + 3 {
            state.set_members(topic(&format!("g{n}")), full.clone());
            assert!(state.members <= MAX_GATED_MEMBERS);
        }
        assert_eq!(state.topics.len(), fit);
        assert!(state.allows(&stranger, &topic("g2")));
        assert!(!state.allows(&stranger, &topic("g3")));
        assert_eq!(
            state.members,
            state.topics.values().map(|a| a.peers.len()).sum::<usize>()
        );
    }
}
