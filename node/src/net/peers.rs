//! The peers the network task keeps connected: known peers and their
//! addresses, dialing (through a DHT lookup when no address is known),
//! redialing with jittered exponential backoff, and the strikes and bans
//! of peers that misbehave.

use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use super::PeerSource;
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
/// Strikes within [`STRIKE_WINDOW`] that get a peer banned.
pub const MAX_STRIKES: u32 = 16;
const STRIKE_WINDOW: Duration = Duration::from_secs(600);
/// How long a banned peer stays banned.
pub const BAN_DURATION: Duration = Duration::from_secs(3600);
/// Most concurrent DHT lookups of peers to dial.
const MAX_DHT_LOOKUPS: usize = 64;
/// Most peers tracked for strikes and bans.
const MAX_TRACKED_OFFENDERS: usize = 4096;

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

    pub(super) fn dial(&mut self, peer: PeerId, source: PeerSource) {
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

    pub(super) fn penalize(&mut self, peer: PeerId, reason: &'static str) {
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
