//! The peers the network task keeps connected: known peers and their
//! addresses, dialing (through a DHT lookup when no address is known),
//! redialing with jittered exponential backoff, and what a strike or a ban
//! does to the swarm (the counting is `offenders`).

use std::net::IpAddr;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use weft_proto::address::AddressKey;

use super::PeerSource;
use super::offenders::{self, BAN_DURATION, IP_BANS, Struck};
use super::scoring::GRAYLIST;
use super::task::NetworkTask;

use crate::backoff;

/// A peer the task keeps redialing while it is disconnected.
pub(super) struct KnownPeer {
    addrs: Vec<Multiaddr>,
    source: PeerSource,
    /// Failed dials and lost connections since the last connection.
    pub(super) attempts: u32,
    /// When the redial timer may dial the peer next.
    next_dial_at: tokio::time::Instant,
}

const MAX_KNOWN_PEERS: usize = 4096;
/// How often the redial timer looks for peers due a dial.
pub(super) const REDIAL_TICK: Duration = Duration::from_millis(500);
/// Most dials the redial timer starts per tick.
const MAX_REDIALS_PER_TICK: usize = 64;
/// Most concurrent DHT lookups of peers to dial.
const MAX_DHT_LOOKUPS: usize = 64;

/// `addr` ending with `/p2p/<peer>` (added if missing; `None` if it names
/// another peer).
pub(super) fn with_peer(mut addr: Multiaddr, peer: PeerId) -> Option<Multiaddr> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => Some(addr),
        Some(Protocol::P2p(_)) => None,
        _ => {
            addr.push(Protocol::P2p(peer));
            Some(addr)
        }
    }
}

/// Now plus `delay`, or plus a day if a huge `redial_max` would overflow
/// the clock.
fn after(delay: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(delay)
        .unwrap_or(now + Duration::from_secs(86_400))
}

impl NetworkTask {
    pub(super) fn remember(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, source: PeerSource) {
        if self.is_banned(&peer)
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

    pub(super) fn dial(&mut self, peer: PeerId, source: PeerSource) {
        if peer == *self.swarm.local_peer_id()
            || self.swarm.is_connected(&peer)
            || self.is_banned(&peer)
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
    pub(super) fn back_off(&mut self, peer: PeerId) {
        let redial = self.config.redial_backoff();
        if let Some(known) = self.known_peers.get_mut(&peer) {
            known.next_dial_at = after(redial.delay(known.attempts, backoff::jitter()));
            known.attempts = known.attempts.saturating_add(1);
        }
    }

    /// The network may be back (an interface came up, a peer connected):
    /// dial every known disconnected peer on the next tick.
    pub(super) fn reset_backoff(&mut self) {
        let now = tokio::time::Instant::now();
        for (peer, known) in &mut self.known_peers {
            if !self.swarm.is_connected(peer) {
                known.attempts = 0;
                known.next_dial_at = now;
            }
        }
    }

    /// Whether `peer` is banned (by its id; its address is checked as it
    /// connects).
    pub(super) fn is_banned(&self, peer: &PeerId) -> bool {
        self.offenders
            .is_banned(peer, None, tokio::time::Instant::now())
    }

    /// The address a connected peer came from, if it has one.
    fn address_of(&self, peer: &PeerId) -> Option<IpAddr> {
        self.peers
            .get(peer)
            .and_then(|p| p.addrs.iter().find_map(offenders::ip_of))
    }

    pub(super) fn penalize(&mut self, peer: PeerId, reason: &'static str) {
        let ip = self.address_of(&peer);
        match self.offenders.strike(peer, ip, tokio::time::Instant::now()) {
            Struck::Counted => tracing::debug!(%peer, "penalised: {reason}"),
            Struck::Banned { address } => self.cut_off(peer, ip, address, reason),
        }
    }

    /// Bans `peer` (and, with enough bans from its address, the address).
    fn ban(&mut self, peer: PeerId, reason: &'static str) {
        let ip = self.address_of(&peer);
        let address = self.offenders.ban(peer, ip, tokio::time::Instant::now());
        self.cut_off(peer, ip, address, reason);
    }

    /// Disconnects a peer just banned, and every peer connected from its
    /// address if that is banned too.
    fn cut_off(&mut self, peer: PeerId, ip: Option<IpAddr>, address: bool, reason: &'static str) {
        tracing::warn!(%peer, "banned for {BAN_DURATION:?}: {reason}");
        let mut gone = vec![peer];
        if address && let Some(ip) = ip {
            // Everyone from the banned address's key (IPv6: its /64).
            let key = AddressKey::of_ip(ip);
            tracing::warn!(address = %key, "address banned for {BAN_DURATION:?}: {IP_BANS} peers from it were");
            gone.extend(
                self.peers
                    .values()
                    .filter(|p| {
                        p.addrs
                            .iter()
                            .filter_map(offenders::ip_of)
                            .any(|a| AddressKey::of_ip(a) == key)
                    })
                    .map(|p| p.peer_id),
            );
        }
        for peer in gone {
            self.known_peers.remove(&peer);
            let behaviour = self.swarm.behaviour_mut();
            behaviour.gossipsub.blacklist_peer(&peer);
            behaviour.kad.remove_peer(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Bans the connected peers whose gossip score fell below the
    /// graylist threshold: gossipsub only ignores them, and they would
    /// keep a connection and keep sending (checked every redial tick).
    pub(super) fn ban_graylisted(&mut self) {
        let gossip = &self.swarm.behaviour().gossipsub;
        let graylisted: Vec<PeerId> = self
            .peers
            .keys()
            .filter(|p| gossip.peer_score(p).is_some_and(|s| s < GRAYLIST))
            .copied()
            .collect();
        for peer in graylisted {
            self.ban(peer, "gossip score below the graylist threshold");
        }
    }

    pub(super) fn unban_expired(&mut self) {
        for peer in self.offenders.expire(tokio::time::Instant::now()) {
            self.swarm
                .behaviour_mut()
                .gossipsub
                .remove_blacklisted_peer(&peer);
        }
    }

    /// Dials the known disconnected peers whose backoff has run out, at
    /// most [`MAX_REDIALS_PER_TICK`] of them.
    pub(super) fn redial(&mut self) {
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
}
