//! Finding relays through the DHT. Relays announce themselves as providers
//! of [`RELAY_PROVIDER_KEY`]; while the node uses fewer relays than it
//! wants, it asks the DHT for providers, connects to them, and adopts a
//! provider once identify shows that it really serves circuit relay v2 and
//! the mailbox protocol (a provider record alone is only a claim).
//!
//! This module only keeps the books; the network task runs the queries,
//! dials and listens.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, kad};
use tokio::time::Instant;

pub use weft_proto::net::RELAY_PROVIDER_KEY;
/// The circuit relay v2 protocol a relay must speak to be adopted.
pub const HOP_PROTOCOL: &str = "/libp2p/circuit/relay/0.2.0/hop";

/// Wait between queries while relays are still wanted.
const QUERY_INTERVAL: Duration = Duration::from_secs(600);
/// Wait after a query that found nothing new (the DHT may still be
/// filling): shorter, at first.
const RETRY_INTERVAL: Duration = Duration::from_secs(60);
/// Providers being tried at once (a hostile DHT could name thousands).
const MAX_CANDIDATES: usize = 16;

/// The key as Kademlia wants it.
pub fn relay_key() -> kad::RecordKey {
    kad::RecordKey::new(&RELAY_PROVIDER_KEY)
}

#[derive(Debug)]
pub(super) struct RelayDiscovery {
    /// Relays to use in all (configured ones count); 0: no discovery.
    wanted: usize,
    /// Relays in use: configured and adopted.
    using: HashSet<PeerId>,
    /// Providers dialed, not yet confirmed by identify.
    candidates: HashSet<PeerId>,
    /// Connected peers whose identify shows a relay, with the address to
    /// reach them at.
    serving: HashMap<PeerId, Multiaddr>,
    query: Option<kad::QueryId>,
    /// Whether the running query found anything new.
    query_found: bool,
    next_query_at: Instant,
}

impl RelayDiscovery {
    pub(super) fn new(wanted: usize, configured: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            wanted,
            using: configured.into_iter().collect(),
            candidates: HashSet::new(),
            serving: HashMap::new(),
            query: None,
            query_found: false,
            next_query_at: Instant::now(),
        }
    }

    fn wants_more(&self) -> bool {
        self.using.len() < self.wanted
    }

    /// Whether to start a query now.
    pub(super) fn due(&self, now: Instant, dht_ready: bool) -> bool {
        dht_ready && self.query.is_none() && self.wants_more() && now >= self.next_query_at
    }

    pub(super) fn started(&mut self, query: kad::QueryId) {
        self.query = Some(query);
        self.query_found = false;
    }

    pub(super) fn is_query(&self, query: &kad::QueryId) -> bool {
        self.query.as_ref() == Some(query)
    }

    /// The query ended: the next one after a while.
    pub(super) fn finished(&mut self, now: Instant) {
        self.query = None;
        let wait = if self.query_found {
            QUERY_INTERVAL
        } else {
            RETRY_INTERVAL
        };
        self.next_query_at = now + wait;
    }

    /// The DHT named these providers. Returns the relays adopted now
    /// (already connected and confirmed) and the peers to dial.
    pub(super) fn providers(
        &mut self,
        providers: impl IntoIterator<Item = PeerId>,
        me: &PeerId,
    ) -> (Vec<(PeerId, Multiaddr)>, Vec<PeerId>) {
        let mut adopted = Vec::new();
        let mut dial = Vec::new();
        for peer in providers {
            if peer == *me || self.using.contains(&peer) || !self.wants_more() {
                continue;
            }
            self.query_found = true;
            if let Some(addr) = self.serving.get(&peer).cloned() {
                self.using.insert(peer);
                adopted.push((peer, addr));
            } else if self.candidates.len() < MAX_CANDIDATES && self.candidates.insert(peer) {
                dial.push(peer);
            }
        }
        (adopted, dial)
    }

    /// Identify told what `peer` speaks and where it listens. Returns the
    /// relay to adopt, if it is a wanted candidate that serves.
    pub(super) fn identified(
        &mut self,
        peer: PeerId,
        protocols: &[impl AsRef<str>],
        listen: &[Multiaddr],
        connected_at: &[Multiaddr],
    ) -> Option<(PeerId, Multiaddr)> {
        let speaks = |p: &str| protocols.iter().any(|q| q.as_ref() == p);
        if !(speaks(HOP_PROTOCOL) && speaks(crate::mailbox::MAILBOX_PROTOCOL)) {
            return None;
        }
        let addr = dial_addr(peer, listen, connected_at)?;
        self.serving.insert(peer, addr.clone());
        if self.candidates.remove(&peer) && self.wants_more() && self.using.insert(peer) {
            return Some((peer, addr));
        }
        None
    }

    /// A dial of a candidate failed for good, or a peer disconnected.
    pub(super) fn gone(&mut self, peer: &PeerId) {
        self.serving.remove(peer);
        self.candidates.remove(peer);
    }
}

/// Where to reach a relay: one of its listen addresses (not a circuit),
/// preferring one on the host we are connected to, with `/p2p/<relay>`.
fn dial_addr(peer: PeerId, listen: &[Multiaddr], connected_at: &[Multiaddr]) -> Option<Multiaddr> {
    let host = |a: &Multiaddr| -> Option<Protocol<'static>> {
        a.iter()
            .next()
            .filter(|p| {
                matches!(
                    p,
                    Protocol::Ip4(_)
                        | Protocol::Ip6(_)
                        | Protocol::Dns(_)
                        | Protocol::Dns4(_)
                        | Protocol::Dns6(_)
                        | Protocol::Memory(_)
                )
            })
            .map(|p| p.acquire())
    };
    let direct = listen
        .iter()
        .filter(|a| !a.iter().any(|p| p == Protocol::P2pCircuit) && host(a).is_some());
    let hosts: Vec<_> = connected_at.iter().filter_map(host).collect();
    let best = direct
        .clone()
        .find(|a| host(a).is_some_and(|h| hosts.contains(&h)))
        .or_else(|| direct.clone().next())?;
    let mut addr = best.clone();
    if let Some(Protocol::P2p(p)) = addr.iter().last() {
        if p != peer {
            return None;
        }
    } else {
        addr.push(Protocol::P2p(peer));
    }
    Some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    const RELAY_PROTOCOLS: [&str; 2] = [HOP_PROTOCOL, crate::mailbox::MAILBOX_PROTOCOL];

    #[test]
    fn a_provider_is_adopted_only_once_identify_confirms_it_serves() {
        let (me, relay, liar) = (peer(), peer(), peer());
        let mut d = RelayDiscovery::new(2, []);
        let (adopted, dial) = d.providers([relay, liar, me], &me);
        assert!(adopted.is_empty());
        assert_eq!(dial.len(), 2, "both dialed, not myself");
        let listen: Vec<Multiaddr> = vec![
            "/ip4/127.0.0.1/tcp/4040".parse().unwrap(),
            "/ip4/10.1.1.1/tcp/4040".parse().unwrap(),
        ];
        let at: Vec<Multiaddr> = vec!["/ip4/10.1.1.1/tcp/4040".parse().unwrap()];
        // The liar speaks no relay protocol.
        assert!(
            d.identified(liar, &["/ipfs/id/1.0.0"], &listen, &at)
                .is_none()
        );
        let (r, addr) = d.identified(relay, &RELAY_PROTOCOLS, &listen, &at).unwrap();
        assert_eq!(r, relay);
        assert_eq!(
            addr.to_string(),
            format!("/ip4/10.1.1.1/tcp/4040/p2p/{relay}"),
            "the address on the host we reached it at"
        );
        // Named again: already in use.
        assert_eq!(d.providers([relay], &me), (vec![], vec![]));
    }

    #[test]
    fn no_more_than_wanted_and_configured_ones_count() {
        let (me, configured, a, b) = (peer(), peer(), peer(), peer());
        let listen: Vec<Multiaddr> = vec!["/memory/9".parse().unwrap()];
        let mut d = RelayDiscovery::new(2, [configured]);
        // Already connected and known to serve: adopted at once.
        assert!(d.identified(a, &RELAY_PROTOCOLS, &listen, &[]).is_none());
        assert!(d.identified(b, &RELAY_PROTOCOLS, &listen, &[]).is_none());
        let (adopted, dial) = d.providers([a, b], &me);
        assert_eq!(adopted.len(), 1, "one more makes two");
        assert!(dial.is_empty());
        assert!(!d.due(Instant::now(), true), "enough relays: no queries");
        assert!(!RelayDiscovery::new(0, []).due(Instant::now(), true));
    }

    #[tokio::test(start_paused = true)]
    async fn queries_wait_for_the_dht_and_are_spaced() {
        let mut d = RelayDiscovery::new(1, []);
        let now = Instant::now();
        assert!(!d.due(now, false), "no DHT yet");
        assert!(d.due(now, true));
        // A query that found nothing: again after the short wait.
        d.finished(now);
        assert!(!d.due(now, true));
        assert!(d.due(now + RETRY_INTERVAL, true));
        // One that found a provider: after the long one.
        let me = peer();
        let _ = d.providers([peer()], &me);
        d.finished(now);
        assert!(!d.due(now + RETRY_INTERVAL, true));
        assert!(d.due(now + QUERY_INTERVAL, true));
    }
}
