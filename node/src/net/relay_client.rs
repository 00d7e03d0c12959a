//! Listening through circuit relays (v2): for each configured relay, once
//! the node is connected to it, the network task listens on
//! `<relay addr>/p2p/<relay>/p2p-circuit`, which reserves a slot there and
//! makes the node reachable at `…/p2p/<relay>/p2p-circuit/p2p/<node>`
//! however it is connected (NAT, firewall). The reservation lives as long
//! as the connection to the relay; when it goes, the listener closes and
//! is opened again once the relay is back. A relay that refuses the
//! reservation is asked again after an exponentially growing wait.
//!
//! This module only keeps the books; the network task does the listening.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::time::Instant;

/// The circuit listener at one relay.
#[derive(Debug)]
struct Entry {
    /// `<relay addr>/p2p/<relay>/p2p-circuit`.
    circuit: Multiaddr,
    /// The open listener, if any.
    listener: Option<ListenerId>,
    /// Whether the relay accepted the open listener's reservation.
    reserved: bool,
    /// Refused or failed reservations since the last accepted one.
    attempts: u32,
    /// When a listener may be opened next.
    next_at: Instant,
}

/// The circuit listeners at the configured relays.
#[derive(Debug, Default)]
pub(super) struct RelayListeners {
    entries: HashMap<PeerId, Entry>,
}

/// `addr` (ending with `/p2p/<relay>`) as a circuit listen address, with
/// the relay's peer id.
pub(super) fn circuit_listen_addr(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    if addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    match addr.iter().last() {
        Some(Protocol::P2p(relay)) => Some((relay, addr.clone().with(Protocol::P2pCircuit))),
        _ => None,
    }
}

/// Whether `addr` goes through a relay.
pub(super) fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

impl RelayListeners {
    /// The relays of `relays` (multiaddrs with `/p2p/<relay>`); others are
    /// ignored.
    pub(super) fn new(relays: &[Multiaddr], now: Instant) -> Self {
        let mut listeners = Self::default();
        for addr in relays {
            listeners.add(addr, now);
        }
        listeners
    }

    /// Adds a relay (an address with `/p2p/<relay>`); false if it is not
    /// such an address or the relay is known already.
    pub(super) fn add(&mut self, addr: &Multiaddr, now: Instant) -> bool {
        let Some((relay, circuit)) = circuit_listen_addr(addr) else {
            return false;
        };
        if self.entries.contains_key(&relay) {
            return false;
        }
        self.entries.insert(
            relay,
            Entry {
                circuit,
                listener: None,
                reserved: false,
                attempts: 0,
                next_at: now,
            },
        );
        true
    }

    /// The relays, by peer id.
    pub(super) fn relays(&self) -> Vec<PeerId> {
        self.entries.keys().copied().collect()
    }

    pub(super) fn is_relay(&self, peer: &PeerId) -> bool {
        self.entries.contains_key(peer)
    }

    /// Relays to listen through now: `connected`, without a listener, and
    /// past their wait. Returns (relay, circuit listen address).
    pub(super) fn due(
        &self,
        now: Instant,
        connected: impl Fn(&PeerId) -> bool,
    ) -> Vec<(PeerId, Multiaddr)> {
        self.entries
            .iter()
            .filter(|(relay, e)| e.listener.is_none() && e.next_at <= now && connected(relay))
            .map(|(relay, e)| (*relay, e.circuit.clone()))
            .collect()
    }

    /// A listener was opened through `relay`.
    pub(super) fn opened(&mut self, relay: &PeerId, listener: ListenerId) {
        if let Some(e) = self.entries.get_mut(relay) {
            e.listener = Some(listener);
            e.reserved = false;
        }
    }

    /// The relay accepted our reservation (or renewed it).
    pub(super) fn reserved(&mut self, relay: &PeerId) {
        if let Some(e) = self.entries.get_mut(relay) {
            e.reserved = true;
            e.attempts = 0;
        }
    }

    /// Opening a listener through `relay` failed at once; try again after
    /// `delay(attempts)`.
    pub(super) fn failed(&mut self, relay: &PeerId, now: Instant, delay: impl Fn(u32) -> Duration) {
        if let Some(e) = self.entries.get_mut(relay) {
            e.listener = None;
            e.reserved = false;
            e.next_at = now + delay(e.attempts);
            e.attempts = e.attempts.saturating_add(1);
        }
    }

    /// A listener closed. Returns its relay if it was a circuit listener.
    /// One whose reservation had been accepted and that closed without an
    /// error (the connection to the relay went) may be opened again at
    /// once (when the relay is connected); otherwise after a backoff.
    pub(super) fn closed(
        &mut self,
        listener: ListenerId,
        error: bool,
        now: Instant,
        delay: impl Fn(u32) -> Duration,
    ) -> Option<PeerId> {
        let (relay, e) = self
            .entries
            .iter_mut()
            .find(|(_, e)| e.listener == Some(listener))?;
        let relay = *relay;
        if error || !e.reserved {
            e.next_at = now + delay(e.attempts);
            e.attempts = e.attempts.saturating_add(1);
        } else {
            e.next_at = now;
        }
        e.listener = None;
        e.reserved = false;
        Some(relay)
    }

    /// The open circuit listeners (closed on stop).
    pub(super) fn listeners(&self) -> Vec<ListenerId> {
        self.entries.values().filter_map(|e| e.listener).collect()
    }
}

/// Listen addresses as the node reports them: without the node's own
/// `/p2p/<peer>` suffix (circuit listen addresses carry it; the others do
/// not, and callers add it themselves), without duplicates, direct ones
/// first.
pub(super) fn normalize_listen(
    addrs: impl IntoIterator<Item = Multiaddr>,
    me: &PeerId,
) -> Vec<Multiaddr> {
    let mut direct = Vec::new();
    let mut circuits = Vec::new();
    for mut addr in addrs {
        if addr.iter().last() == Some(Protocol::P2p(*me)) {
            addr.pop();
        }
        let list = if is_circuit(&addr) {
            &mut circuits
        } else {
            &mut direct
        };
        if !list.contains(&addr) {
            list.push(addr);
        }
    }
    direct.extend(circuits);
    direct
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn delay(attempts: u32) -> Duration {
        Duration::from_secs(1 << attempts.min(5))
    }

    #[test]
    fn circuit_listen_addresses_need_the_relay_peer_id() {
        let relay = peer();
        let addr: Multiaddr = format!("/ip4/10.0.0.1/tcp/4040/p2p/{relay}")
            .parse()
            .unwrap();
        let (r, circuit) = circuit_listen_addr(&addr).unwrap();
        assert_eq!(r, relay);
        assert_eq!(
            circuit.to_string(),
            format!("/ip4/10.0.0.1/tcp/4040/p2p/{relay}/p2p-circuit")
        );
        assert!(is_circuit(&circuit));
        assert!(circuit_listen_addr(&"/ip4/10.0.0.1/tcp/4040".parse().unwrap()).is_none());
        assert!(circuit_listen_addr(&circuit.with(Protocol::P2p(peer()))).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn listeners_open_when_connected_and_back_off_when_refused() {
        let relay = peer();
        let other = peer();
        let addr: Multiaddr = format!("/memory/7/p2p/{relay}").parse().unwrap();
        let now = Instant::now();
        let mut r = RelayListeners::new(&[addr, "/memory/8".parse().unwrap()], now);
        assert!(r.is_relay(&relay) && !r.is_relay(&other));
        assert!(r.due(now, |_| false).is_empty(), "not connected");
        let due = r.due(now, |_| true);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, relay);

        let id = ListenerId::next();
        r.opened(&relay, id);
        assert!(r.due(now, |_| true).is_empty(), "already listening");
        assert_eq!(r.listeners(), vec![id]);
        // Refused: a backoff, growing.
        assert_eq!(r.closed(id, true, now, delay), Some(relay));
        assert!(r.due(now, |_| true).is_empty());
        assert_eq!(r.due(now + delay(0), |_| true).len(), 1);
        let id = ListenerId::next();
        r.opened(&relay, id);
        r.closed(id, false, now, delay); // closed before any reservation
        assert!(r.due(now + delay(0), |_| true).is_empty());
        assert_eq!(r.due(now + delay(1), |_| true).len(), 1);
        // Accepted, then the connection went: again at once.
        let id = ListenerId::next();
        r.opened(&relay, id);
        r.reserved(&relay);
        assert_eq!(r.closed(id, false, now, delay), Some(relay));
        assert_eq!(r.due(now, |_| true).len(), 1);
        assert_eq!(r.closed(ListenerId::next(), false, now, delay), None);
        // A failure to open at all backs off too.
        r.failed(&relay, now, delay);
        assert!(r.due(now, |_| true).is_empty());
        assert!(r.listeners().is_empty());
    }

    #[test]
    fn listen_addresses_are_normalized() {
        let me = peer();
        let relay = peer();
        let tcp: Multiaddr = "/ip4/10.0.0.2/tcp/1".parse().unwrap();
        let circuit: Multiaddr = format!("/ip4/10.0.0.1/tcp/4040/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        let out = normalize_listen(
            [
                circuit.clone().with(Protocol::P2p(me)),
                tcp.clone(),
                circuit.clone(),
            ],
            &me,
        );
        assert_eq!(out, vec![tcp, circuit]);
    }
}
