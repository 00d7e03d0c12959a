//! Strikes and bans of misbehaving peers, by peer id and by IP address.
//!
//! A peer id is free to make, so bans by peer id alone are escaped by
//! coming back under a fresh one. Each ban therefore also counts against
//! the address the peer came from: [`IP_BANS`] peer ids banned from one
//! address within [`BAN_DURATION`] ban the address, and a connection from
//! a banned address is refused whatever its peer id. Loopback is never
//! banned (local processes share it, and a local attacker has easier
//! ways in).
//!
//! Every table is an LRU of at most [`MAX_TRACKED`] entries: a new
//! offender always finds room (the one heard from longest ago goes), so
//! a flood of offenders cannot make the node stop tracking new ones.
//! Pure: time is passed in.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::multiaddr::{Multiaddr, Protocol};
use lru::LruCache;
use tokio::time::Instant;

/// Strikes within [`STRIKE_WINDOW`] that get a peer banned.
pub const MAX_STRIKES: u32 = 16;
pub(super) const STRIKE_WINDOW: Duration = Duration::from_secs(600);
/// How long a ban lasts, of a peer or of an address.
pub const BAN_DURATION: Duration = Duration::from_secs(3600);
/// Peer ids banned from one address (within [`BAN_DURATION`]) that ban
/// the address.
pub const IP_BANS: u32 = 3;
/// Most entries in each table.
const MAX_TRACKED: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// The IP address a connection's remote address starts with, if any:
/// none for the memory transport, nor for a connection through a circuit
/// relay (inbound its address is `/p2p/<peer>`; dialed it starts with the
/// relay's address, and the peer's offences must not count against the
/// relay's address: three would ban the relay and every peer behind it).
pub(super) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// What a strike came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Struck {
    /// Counted; not banned (yet).
    Counted,
    /// The peer is banned now (and, if `address`, its address too).
    Banned { address: bool },
}

pub(super) struct Offenders {
    strikes: LruCache<PeerId, (u32, Instant)>,
    banned: LruCache<PeerId, Instant>,
    /// Peer ids banned from an address, and since when.
    address_bans: LruCache<IpAddr, (u32, Instant)>,
    banned_addresses: LruCache<IpAddr, Instant>,
}

impl Default for Offenders {
    fn default() -> Self {
        Self {
            strikes: LruCache::new(MAX_TRACKED),
            banned: LruCache::new(MAX_TRACKED),
            address_bans: LruCache::new(MAX_TRACKED),
            banned_addresses: LruCache::new(MAX_TRACKED),
        }
    }
}

impl Offenders {
    /// A strike against `peer`, connected from `ip` (if known).
    pub(super) fn strike(&mut self, peer: PeerId, ip: Option<IpAddr>, now: Instant) -> Struck {
        let entry = self.strikes.get_or_insert_mut(peer, || (0, now));
        if now.duration_since(entry.1) >= STRIKE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        if entry.0 < MAX_STRIKES {
            return Struck::Counted;
        }
        self.strikes.pop(&peer);
        let address = self.ban(peer, ip, now);
        Struck::Banned { address }
    }

    /// Bans `peer` now, counting it against `ip`; whether the address is
    /// banned now too.
    pub(super) fn ban(&mut self, peer: PeerId, ip: Option<IpAddr>, now: Instant) -> bool {
        self.banned.put(peer, now + BAN_DURATION);
        let Some(ip) = ip.filter(|ip| !ip.is_loopback()) else {
            return false;
        };
        let count = self.address_bans.get_or_insert_mut(ip, || (0, now));
        if now.duration_since(count.1) >= BAN_DURATION {
            *count = (0, now);
        }
        count.0 += 1;
        if count.0 < IP_BANS {
            return false;
        }
        self.address_bans.pop(&ip);
        self.banned_addresses.put(ip, now + BAN_DURATION);
        true
    }

    /// Whether a connection of `peer` from `ip` is to be refused.
    pub(super) fn is_banned(&self, peer: &PeerId, ip: Option<IpAddr>, now: Instant) -> bool {
        let live = |until: Option<&Instant>| until.is_some_and(|u| *u > now);
        live(self.banned.peek(peer)) || ip.is_some_and(|ip| live(self.banned_addresses.peek(&ip)))
    }

    /// Ends the bans that ran out; the peers whose ban ended.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let ended: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in &ended {
            self.banned.pop(peer);
        }
        let ended_addresses: Vec<IpAddr> = self
            .banned_addresses
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in ended_addresses {
            self.banned_addresses.pop(&ip);
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const FAR: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

    fn strike_out(o: &mut Offenders, peer: PeerId, ip: Option<IpAddr>, now: Instant) -> Struck {
        for _ in 1..MAX_STRIKES {
            assert_eq!(o.strike(peer, ip, now), Struck::Counted);
        }
        o.strike(peer, ip, now)
    }

    #[test]
    fn strikes_ban_a_peer_for_a_while_and_old_strikes_lapse() {
        let mut o = Offenders::default();
        let now = Instant::now();
        let mallory = PeerId::random();
        for _ in 1..MAX_STRIKES {
            o.strike(mallory, None, now);
        }
        // The window passed: counting starts again (15 more are not enough).
        let later = now + STRIKE_WINDOW;
        assert!(!o.is_banned(&mallory, None, later));
        assert_eq!(
            strike_out(&mut o, mallory, None, later),
            Struck::Banned { address: false }
        );
        assert!(o.is_banned(&mallory, None, later));
        assert_eq!(o.expire(later + BAN_DURATION), vec![mallory]);
        assert!(!o.is_banned(&mallory, None, later + BAN_DURATION));
    }

    #[test]
    fn fresh_peer_ids_from_a_banned_address_are_refused() {
        let mut o = Offenders::default();
        let now = Instant::now();
        for n in 1..=IP_BANS {
            let struck = strike_out(&mut o, PeerId::random(), Some(FAR), now);
            assert_eq!(
                struck,
                Struck::Banned {
                    address: n == IP_BANS
                }
            );
        }
        let fresh = PeerId::random();
        assert!(o.is_banned(&fresh, Some(FAR), now), "a fresh id from there");
        assert!(
            !o.is_banned(&fresh, None, now),
            "the id itself is not banned"
        );
        assert!(!o.is_banned(&fresh, Some(FAR), now + BAN_DURATION));
    }

    #[test]
    fn loopback_is_never_banned() {
        let mut o = Offenders::default();
        let now = Instant::now();
        let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for _ in 0..IP_BANS {
            strike_out(&mut o, PeerId::random(), local, now);
        }
        assert!(!o.is_banned(&PeerId::random(), local, now));
    }

    #[test]
    fn a_new_offender_always_finds_room() {
        let mut o = Offenders::default();
        let now = Instant::now();
        for _ in 0..MAX_TRACKED.get() + 10 {
            o.strike(PeerId::random(), None, now);
        }
        assert_eq!(o.strikes.len(), MAX_TRACKED.get());
        let newcomer = PeerId::random();
        assert_eq!(
            strike_out(&mut o, newcomer, None, now),
            Struck::Banned { address: false },
            "tracked though the table was full"
        );
    }

    #[test]
    fn the_address_of_a_connection() {
        let tcp: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
        assert_eq!(ip_of(&tcp), Some(FAR));
        let memory: Multiaddr = "/memory/7".parse().unwrap();
        assert_eq!(ip_of(&memory), None);
        let relay = PeerId::random();
        let through_a_relay: Multiaddr = format!(
            "/ip4/203.0.113.7/tcp/4040/p2p/{relay}/p2p-circuit/p2p/{}",
            PeerId::random()
        )
        .parse()
        .unwrap();
        assert_eq!(ip_of(&through_a_relay), None, "not the relay's address");
    }
}
